//! `kiln`: the host CLI. Check a spec, print its schema, render it, diff two generations.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

mod ui;
use kiln_builder::base::Cache;
use kiln_builder::build;
use kiln_spec::diff::diff;
use kiln_spec::render::{Manifest, read_manifest, render, write_tree};
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
    /// Render the files kiln manages on the device into DIR (DIR/etc/..., plus DIR/etc/kiln/manifest.json).
    Render {
        spec: PathBuf,
        /// Output directory; written beside it and renamed into place when complete.
        #[arg(long)]
        out: PathBuf,
    },
    /// List what changes between two generations and what applying it takes. Each side is a
    /// spec file or a directory written by `kiln render`.
    Diff { old: PathBuf, new: PathBuf },
    /// Build a flashable image: DIR/NAME.img, NAME.img.bmap, NAME.img.sha256. Rootless; the
    /// base is cached (KILN_CACHE, default ~/.cache/kiln); SOURCE_DATE_EPOCH makes it bit-reproducible.
    Build {
        spec: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The kilnd binary for the board's architecture (default: the one next to kiln).
        #[arg(long)]
        kilnd: Option<PathBuf>,
        /// Also write a compressed image.
        #[arg(long, value_enum)]
        compress: Option<CompressArg>,
    },
    /// Write an image to an SD card, NVMe disk or file: refuses disks in use, writes only
    /// mapped blocks (the first MiB last), verifies them against the block map, and wipes the
    /// partition table if anything fails so a half-written disk never boots.
    Flash {
        image: PathBuf,
        target: PathBuf,
        /// Block map (default: IMAGE.bmap, else the image is mapped now).
        #[arg(long)]
        bmap: Option<PathBuf>,
        /// Do not ask for confirmation (the safety checks still run).
        #[arg(long)]
        yes: bool,
    },
    /// Boot a built VM image (generic-x86_64, generic-aarch64) in QEMU: kilnd's API and SSH
    /// forwarded to host ports, printed once the guest's kilnd answers; runs until stopped.
    Vm {
        image: PathBuf,
        #[arg(long, default_value_t = 8080)]
        api_port: u16,
        #[arg(long, default_value_t = 2222)]
        ssh_port: u16,
        /// The port kilnd listens on in the guest (the spec's supervisor.listen).
        #[arg(long, default_value_t = 8080)]
        guest_api_port: u16,
        /// tcg (default) or kvm (opt-in: nested KVM hangs on some hosts).
        #[arg(long, value_enum, default_value_t = AccelArg::Tcg)]
        accel: AccelArg,
        #[arg(long, default_value_t = 2048)]
        memory_mib: u32,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Serial console log (default: IMAGE.serial.log).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        /// Keep the guest's writes in the image (default: discarded).
        #[arg(long)]
        persist: bool,
        /// Seconds to wait for kilnd in the guest.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Re-deploy an edited spec to a running device over SSH as a new generation: sends only
    /// what changed (files by hash, models by sha256), applies only what the diff needs, and
    /// rolls back by itself when kilnd does not become healthy.
    Deploy {
        spec: PathBuf,
        #[command(flatten)]
        ssh: SshArgs,
        /// Show what would change and be sent, then stop.
        #[arg(long)]
        dry_run: bool,
        /// Seconds the new generation has to become healthy (default: the spec's supervisor.deploy.health-timeout).
        #[arg(long)]
        health_timeout: Option<u64>,
    },
    /// Switch the device back to an earlier generation (default: the newest good one before
    /// the active one), with the same health gate.
    Rollback {
        #[command(flatten)]
        ssh: SshArgs,
        #[arg(long)]
        to: Option<u32>,
        #[arg(long)]
        health_timeout: Option<u64>,
    },
    /// List the device's generations (`*` marks the active one).
    Generations {
        #[command(flatten)]
        ssh: SshArgs,
    },
}

#[derive(clap::Args, Debug)]
struct SshArgs {
    /// The device: ssh://user@host[:port] (a user other than root needs passwordless sudo).
    #[arg(long)]
    target: String,
    /// SSH private key.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// A known_hosts file of its own (new host keys are added; a changed one is refused).
    #[arg(long)]
    known_hosts: Option<PathBuf>,
}

impl SshArgs {
    fn target(&self) -> Result<kiln_builder::deploy::Target> {
        let mut t = kiln_builder::deploy::Target::parse(&self.target)?;
        t.identity = self.identity.clone();
        t.known_hosts = self.known_hosts.clone();
        Ok(t)
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum AccelArg {
    Tcg,
    Kvm,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CompressArg {
    Zstd,
    Xz,
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
    use kiln_builder::deploy::{self, DeployOptions, Deployed};
    let mut say = |line: &str| println!("{line}");
    match cli.command {
        Command::Deploy { spec, ssh, dry_run, health_timeout } => {
            let t = ssh.target()?;
            let opts = DeployOptions { dry_run, health_timeout_secs: health_timeout };
            match deploy::deploy(&spec, &t, &opts, &mut say)? {
                Deployed::Unchanged { .. } | Deployed::DryRun => Ok(ExitCode::SUCCESS),
                Deployed::Activated { number } => {
                    println!("deployed: generation {number} is active and healthy on {t}");
                    Ok(ExitCode::SUCCESS)
                }
                Deployed::RolledBack { number } => {
                    eprintln!("error: generation {number} was unhealthy on {t}; the device rolled back (see above)");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Rollback { ssh, to, health_timeout } => {
            let t = ssh.target()?;
            let args = match to {
                Some(n) => format!("rollback --to {n}"),
                None => "rollback".to_string(),
            };
            if deploy::activate_remote(&t, &args, health_timeout, &mut say)? {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: the generation rolled back to was unhealthy; the device went back to the one before");
                Ok(ExitCode::from(2))
            }
        }
        Command::Generations { ssh } => {
            print!("{}", deploy::generations(&ssh.target()?)?);
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Render { spec, out } => {
            let Some(manifest) = rendered(&spec)? else { return Ok(ExitCode::FAILURE) };
            write_tree(&manifest, &out).with_context(|| format!("writing the generation to {}", out.display()))?;
            println!(
                "{}: generation {} ({} entries) in {}",
                spec.display(),
                manifest.generation,
                manifest.entries.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { old, new } => {
            let (Some(a), Some(b)) = (generation(&old)?, generation(&new)?) else { return Ok(ExitCode::FAILURE) };
            println!("generation {} -> {}", a.generation, b.generation);
            print!("{}", diff(&a, &b));
            Ok(ExitCode::SUCCESS)
        }
        Command::Build { spec, out, kilnd, compress } => {
            let opts = build::Options {
                spec,
                out,
                kilnd,
                compress: compress.map(|c| match c {
                    CompressArg::Zstd => build::Compression::Zstd,
                    CompressArg::Xz => build::Compression::Xz,
                }),
                epoch: build::epoch_from_env()?,
                cache: Cache::from_env(),
            };
            let report = build::build(&opts, &ui::Terminal::new())?;
            print!("{}", ui::report(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Flash { image, target, bmap, yes } => {
            // Ctrl-C or a TERM stops the copy and wipes the target's head (a second one kills).
            let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register_conditional_default(sig, cancel.clone())
                    .context("installing the signal handler")?;
                signal_hook::flag::register(sig, cancel.clone()).context("installing the signal handler")?;
            }
            let opts = kiln_builder::flash::FlashOptions { image, bmap, target, assume_yes: yes, cancel: Some(cancel) };
            let report = kiln_builder::flash::flash(&opts, &mut ui::confirm_target, &ui::flash_progress())?;
            println!(
                "flashed {} to {}: {} MiB written and verified ({} ranges) in {:.1}s",
                opts.image.display(),
                opts.target.display(),
                report.bytes_written / (1024 * 1024),
                report.verified_ranges,
                report.seconds
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm {
            image,
            api_port,
            ssh_port,
            guest_api_port,
            accel,
            memory_mib,
            cpus,
            serial_log,
            persist,
            timeout,
        } => {
            let serial_log = serial_log.unwrap_or_else(|| {
                let mut s = image.clone().into_os_string();
                s.push(".serial.log");
                PathBuf::from(s)
            });
            let opts = kiln_builder::vm::VmOptions {
                image,
                api_port,
                ssh_port,
                guest_api_port,
                accel: match accel {
                    AccelArg::Tcg => kiln_builder::vm::Accel::Tcg,
                    AccelArg::Kvm => kiln_builder::vm::Accel::Kvm,
                },
                memory_mib,
                cpus,
                serial_log,
                snapshot: !persist,
                ready_timeout: std::time::Duration::from_secs(timeout),
            };
            eprintln!("booting {} (serial console: {})", opts.image.display(), opts.serial_log.display());
            let mut vm = kiln_builder::vm::boot(&opts)?;
            println!("api: {}", vm.api_url);
            println!("ssh: {}", vm.ssh_url);
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            let status = vm.child.wait().context("waiting for QEMU")?;
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Schema => {
            let text =
                serde_json::to_string_pretty(&kiln_spec::schema::json_schema()).context("serializing the schema")?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Validates and renders a spec; prints its errors and returns None when it is invalid.
fn rendered(spec: &std::path::Path) -> Result<Option<Manifest>> {
    match load_file(spec, Context::Host) {
        Ok(loaded) => Ok(Some(render(&loaded).with_context(|| format!("rendering {}", spec.display()))?)),
        Err(diags) => {
            eprintln!("{diags}");
            eprintln!("{}: {} error(s)", spec.display(), diags.items.len());
            Ok(None)
        }
    }
}

/// A generation from a spec file or a rendered directory.
fn generation(path: &std::path::Path) -> Result<Option<Manifest>> {
    if path.is_dir() {
        Ok(Some(read_manifest(path).with_context(|| format!("reading the generation in {}", path.display()))?))
    } else {
        rendered(path)
    }
}
