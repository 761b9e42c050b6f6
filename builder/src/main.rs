//! `kiln`: the host CLI. Check a spec, print its schema, render it, diff two generations.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kiln_spec::validate::{Context, load_file};

#[derive(Parser, Debug)]
#[command(name = "kiln", version, about = "Declarative images and runtime for LLMs on a Raspberry Pi")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a spec; print where each MiB of RAM goes, or every error with file:line:col.
    Check { spec: PathBuf },
    /// Print the JSON Schema of the spec format (for editor completion).
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check { spec } => match load_file(&spec, Context::Host) {
            Ok(loaded) => {
                for w in loaded.warnings.to_string().lines() {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok ({} on {})", spec.display(), loaded.spec.name, loaded.raw.hardware.ram.0);
                println!("{}", loaded.budget);
                Ok(ExitCode::SUCCESS)
            }
            Err(diags) => {
                eprintln!("{diags}");
                eprintln!("{}: {} error(s)", spec.display(), diags.items.len());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Schema => {
            let text =
                serde_json::to_string_pretty(&kiln_spec::schema::json_schema()).context("serializing the schema")?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
