//! kiln-spec: the kiln spec language. Parse a YAML spec, validate it (every error at once,
//! each with `file:line:col`), and render it into the generation: the exact files kiln
//! manages on the device.
//!
//! The walk for any field: [`raw`] (as written) -> [`validate`] -> [`model`] (validated) ->
//! one template under `templates/`.

pub mod board;
pub mod bootfiles;
pub mod budget;
pub mod diag;
pub mod diff;
pub mod gguf;
pub mod model;
pub mod raw;
pub mod render;
pub mod schema;
pub mod tree;
pub mod units;
pub mod validate;

pub use diag::{Diagnostic, Diagnostics};
pub use model::Spec;
pub use validate::{Context, load_file, load_str};
