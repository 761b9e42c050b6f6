//! raw -> model: parse the text, check its structure against the schema, then check meaning
//! (budgets, references, secrets, files), collecting every problem at once, sorted by line.

mod cache;
mod hardware;
mod models;
mod system;

use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Diagnostics, Pos, Sink};
use crate::model::Spec;
use crate::raw::{self, RawSpec};
use crate::tree::Index;

/// Where a spec is being read: on the host (files it names must exist) or on the device
/// (the normalized `/etc/kiln/spec.yaml`, whose models are already in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Host,
    Device,
}

/// A validated spec, with what `kiln check` shows besides it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub spec: Spec,
    pub raw: RawSpec,
    /// Not errors, but worth saying (e.g. PCIe gen 3 is not certified).
    pub warnings: Diagnostics,
    pub budget: crate::budget::Budget,
}

pub const API_VERSION: &str = "kiln/v1";

/// Reads and validates a spec file. Relative paths in it are relative to its directory.
pub fn load_file(path: &Path, ctx: Context) -> Result<Loaded, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostics::new(path, vec![Diagnostic::new(Pos { line: 1, col: 1 }, "", format!("cannot read the spec: {e}"))])
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    load_str(&text, path, &dir, ctx)
}

/// Validates spec text; `file` names it in messages, `base_dir` anchors its relative paths.
pub fn load_str(text: &str, file: &Path, base_dir: &Path, ctx: Context) -> Result<Loaded, Diagnostics> {
    let fail = |items: Vec<Diagnostic>| Diagnostics::new(file, items);
    if text.trim().is_empty() {
        return Err(fail(vec![Diagnostic::new(
            Pos { line: 1, col: 1 },
            "",
            format!("the spec is empty; start with `api-version: {API_VERSION}`"),
        )]));
    }
    let tree = crate::tree::parse(text).map_err(fail)?;
    if !tree.value.is_object() {
        return Err(fail(vec![Diagnostic::new(
            Pos { line: 1, col: 1 },
            "",
            "a spec is a mapping of keys such as `api-version:` and `name:`",
        )]));
    }
    let structural = crate::schema::check(&tree);
    // With structural errors, drop the values at fault and check the meaning of the rest, so
    // one run reports everything; if what remains cannot be read, the structural errors stand alone.
    let mut value = tree.value.clone();
    for d in &structural {
        crate::tree::remove(&mut value, &d.path);
    }
    let partial = Partial::read(&value);
    let mut v = Validator {
        index: &tree.index,
        sink: Sink::default(),
        warnings: Sink::default(),
        base_dir: base_dir.to_path_buf(),
        ctx,
    };
    let spec = v.spec(&partial);
    let raw = serde_json::from_value::<RawSpec>(value);
    match (spec, raw) {
        (Some((spec, budget)), Ok(raw)) if v.sink.is_empty() && structural.is_empty() => {
            Ok(Loaded { spec, raw, warnings: Diagnostics::new(file, v.warnings.items), budget })
        }
        (_, Err(e)) if structural.is_empty() && v.sink.is_empty() => {
            Err(fail(vec![Diagnostic::new(Pos { line: 1, col: 1 }, "", format!("cannot read the spec: {e}"))]))
        }
        _ => Err(fail(structural.into_iter().chain(v.sink.items).collect())),
    }
}

/// The spec's sections, each read on its own: a section with a structural error is `None`
/// (already reported) and the checks that need it are skipped, while the others still run.
struct Partial {
    api_version: Option<String>,
    name: Option<String>,
    hardware: Option<raw::Hardware>,
    base: Option<Option<raw::Base>>,
    system: Option<raw::System>,
    memory: Option<raw::Memory>,
    cgroups: Option<raw::Cgroups>,
    models: Vec<Option<raw::Model>>,
    cache: Option<raw::Cache>,
    supervisor: Option<raw::Supervisor>,
}

impl Partial {
    fn read(v: &serde_json::Value) -> Partial {
        fn field<T: serde::de::DeserializeOwned + Default>(v: &serde_json::Value, key: &str) -> Option<T> {
            match v.get(key) {
                None => Some(T::default()),
                Some(x) => serde_json::from_value(x.clone()).ok(),
            }
        }
        fn required<T: serde::de::DeserializeOwned>(v: &serde_json::Value, key: &str) -> Option<T> {
            v.get(key).and_then(|x| serde_json::from_value(x.clone()).ok())
        }
        let models = match v.get("models") {
            Some(serde_json::Value::Array(items)) => {
                items.iter().map(|m| serde_json::from_value(m.clone()).ok()).collect()
            }
            Some(_) => vec![None],
            None => vec![],
        };
        Partial {
            api_version: required(v, "api-version"),
            name: required(v, "name"),
            hardware: required(v, "hardware"),
            base: field(v, "base"),
            system: field(v, "system"),
            memory: field(v, "memory"),
            cgroups: field(v, "cgroups"),
            models,
            cache: field(v, "cache"),
            supervisor: field(v, "supervisor"),
        }
    }
}

pub(crate) struct Validator<'a> {
    pub index: &'a Index,
    pub sink: Sink,
    pub warnings: Sink,
    pub base_dir: PathBuf,
    pub ctx: Context,
}

impl Validator<'_> {
    /// Reports an error at the value of `path`.
    pub fn err(&mut self, path: &str, msg: impl Into<String>) {
        let pos = self.index.value(path);
        self.sink.push(pos, path, msg);
    }
    /// Reports an error at the key of `path`.
    pub fn err_key(&mut self, path: &str, msg: impl Into<String>) {
        let pos = self.index.key(path);
        self.sink.push(pos, path, msg);
    }
    pub fn warn(&mut self, path: &str, msg: impl Into<String>) {
        let pos = self.index.value(path);
        self.warnings.push(pos, path, msg);
    }
    /// Parses an optional quantity, reporting a bad one; `None` when absent or bad.
    pub fn qty<T>(
        &mut self,
        path: &str,
        q: Option<&crate::raw::Quantity>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let q = q?;
        match parse(&q.0) {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }
    /// Resolves a host path from the spec against the spec's directory.
    pub fn host_path(&self, p: &str) -> PathBuf {
        let path = Path::new(p.strip_prefix("./").unwrap_or(p));
        if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) }
    }
    /// Checks that a host file named by the spec exists and is a regular file.
    pub fn existing_file(&mut self, path: &str, p: &str, what: &str) -> Option<PathBuf> {
        let full = self.host_path(p);
        match std::fs::metadata(&full) {
            Ok(m) if m.is_file() => Some(full),
            Ok(_) => {
                self.err(path, format!("{what} `{p}` is not a regular file"));
                None
            }
            Err(e) => {
                self.err(path, format!("{what} `{p}` cannot be read ({}): {e}", full.display()));
                None
            }
        }
    }

    fn spec(&mut self, raw: &Partial) -> Option<(Spec, crate::budget::Budget)> {
        if let Some(version) = raw.api_version.as_deref().filter(|v| *v != API_VERSION) {
            self.err("api-version", format!("`{version}` is not a spec version kiln reads; write `{API_VERSION}`"));
        }
        if let Some(name) = raw.name.as_deref().filter(|n| !is_dns_label(n)) {
            self.err("name", format!("`{name}` is not a valid name; use 1-63 lowercase letters, digits and dashes, not starting or ending with a dash"));
        }
        let hardware = raw.hardware.as_ref().and_then(|hw| self.hardware(hw));
        let base = match (&hardware, &raw.base) {
            (Some(hw), Some(base)) => self.base(base.as_ref(), hw),
            _ => None,
        };
        let system = match (&raw.system, &raw.name) {
            (Some(s), Some(name)) => self.system(s, name),
            _ => None,
        };
        let memory = raw.memory.as_ref().and_then(|m| self.memory(m, hardware.as_ref()));
        let cgroups = raw.cgroups.as_ref().and_then(|c| self.cgroups(c, hardware.as_ref()));
        let models = self.models(&raw.models, hardware.as_ref(), cgroups.as_ref());
        let ids: Vec<&str> = raw.models.iter().flatten().map(|m| m.id.as_str()).collect();
        let cache = raw.cache.as_ref().and_then(|c| self.cache(c, memory.as_ref(), models.as_deref(), &ids));
        let supervisor = raw.supervisor.as_ref().and_then(|s| self.supervisor(s));
        let (hardware, base, system, memory, cgroups, models, cache, supervisor) =
            (hardware?, base?, system?, memory?, cgroups?, models?, cache?, supervisor?);
        let spec = Spec { name: raw.name.clone()?, hardware, base, system, memory, cgroups, models, cache, supervisor };
        let budget = crate::budget::Budget::of(&spec);
        self.check_budget(&spec, &budget);
        Some((spec, budget))
    }
}

/// RFC 1123 host label: 1-63 of [a-z0-9-], no leading or trailing dash.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// 64 lowercase hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn sha256_message(s: &str) -> String {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("`{s}` has uppercase digits; write the sha256 in lowercase hex as sha256sum prints it")
    } else {
        format!(
            "`{s}` is not a sha256: expected 64 hex digits as `sha256sum FILE` prints them (found {} characters)",
            s.chars().count()
        )
    }
}
