//! `kilnd`: the on-device supervisor. This skeleton reads and checks the device's spec; the
//! cache engine and the inference server land on top of it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_spec::validate::{Context, load_file};

const DEFAULT_SPEC: &str = "/etc/kiln/spec.yaml";

#[derive(Parser, Debug)]
#[command(name = "kilnd", version, about = "kiln's on-device supervisor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the device's normalized spec (as `kiln render` wrote it) and summarize it.
    Check {
        #[arg(long, default_value = DEFAULT_SPEC)]
        spec: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { spec } => match load_file(&spec, Context::Device) {
            Ok(loaded) => {
                let s = &loaded.spec;
                println!(
                    "{}: ok: {} on {}, {} model(s), listening on {}",
                    spec.display(),
                    s.name,
                    loaded.raw.hardware.ram.0,
                    s.models.len(),
                    s.supervisor.listen
                );
                for m in &s.models {
                    println!(
                        "  {} {} ({} MiB, context {}, {} threads{})",
                        m.id,
                        m.store_path(),
                        kiln_spec::units::mib(m.size_bytes),
                        m.context,
                        m.threads,
                        if m.pin { ", pinned" } else { "" }
                    );
                }
                ExitCode::SUCCESS
            }
            Err(diags) => {
                eprintln!("{diags}");
                ExitCode::FAILURE
            }
        },
    }
}
