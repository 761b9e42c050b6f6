//! kiln-builder: turn a validated spec and its rendered generation into a flashable disk
//! image, rootless (no loop devices, no mounts), reproducible and cached; and flash it safely.

pub mod base;
pub mod build;
pub mod deploy;
pub mod elf;
pub mod flash;
pub mod image;
pub mod models;
pub mod plan;
pub mod tools;
pub mod vm;
