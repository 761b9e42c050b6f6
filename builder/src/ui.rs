//! The terminal side of `kiln build`: a progress bar with throughput for long steps, one line
//! per step, and the build report.

use std::cell::RefCell;
use std::fmt::Write as _;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_builder::build::{Report, Ui};

pub struct Terminal {
    bar: RefCell<Option<(String, ProgressBar)>>,
}

impl Terminal {
    pub fn new() -> Terminal {
        Terminal { bar: RefCell::new(None) }
    }
    fn clear(&self) {
        if let Some((_, bar)) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }
}

impl Ui for Terminal {
    fn step(&self, name: &str) {
        self.clear();
        eprintln!("==> {name}");
    }
    fn progress(&self, what: &str, done: u64, total: u64) {
        let mut slot = self.bar.borrow_mut();
        if slot.as_ref().is_none_or(|(w, _)| w != what) {
            if let Some((_, old)) = slot.take() {
                old.finish_and_clear();
            }
            let bar = ProgressBar::new(total);
            let style =
                ProgressStyle::with_template("    {msg:<24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            *slot = Some((what.to_string(), bar));
        }
        if let Some((_, bar)) = slot.as_ref() {
            bar.set_length(total);
            bar.set_position(done);
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The build report: outputs, partitions, base and cache use, time per step.
pub fn report(r: &Report) -> String {
    let mib = |b: u64| b / (1024 * 1024);
    let mut s = String::new();
    let _ = writeln!(s, "built {} (generation {})", r.image.display(), r.generation);
    for o in &r.outputs {
        let _ = writeln!(s, "  {}", o.display());
    }
    let _ = writeln!(
        s,
        "image: {} MiB, {} MiB mapped (what flashing writes), sha256 {}",
        mib(r.image_bytes),
        mib(r.mapped_bytes),
        r.sha256
    );
    for (label, start, size) in &r.partitions {
        let _ = writeln!(s, "  partition {label:<7} at {:>6} MiB, {:>6} MiB", mib(*start), mib(*size));
    }
    let _ = writeln!(
        s,
        "base: {} ({})",
        r.base_key,
        if r.base_from_cache { "from cache" } else { "prepared now, cached for next time" }
    );
    let total: f64 = r.steps.iter().map(|st| st.seconds).sum();
    for st in &r.steps {
        let _ = writeln!(
            s,
            "  {:>7.2}s  {}{}",
            st.seconds,
            st.name,
            if st.note.is_empty() { String::new() } else { format!(" ({})", st.note) }
        );
    }
    let _ = writeln!(s, "  {total:>7.2}s  total");
    s
}

/// Shows the target and asks y/N on the terminal.
pub fn confirm_target(t: &kiln_builder::flash::TargetInfo) -> bool {
    use std::io::{BufRead, Write};
    let what = if t.is_block_device { "disk" } else { "file" };
    let model = t.model.as_deref().unwrap_or("unknown model");
    eprint!(
        "About to overwrite {what} {} ({model}, {:.1} GiB). Everything on it is lost. Continue? [y/N] ",
        t.path.display(),
        t.size_bytes as f64 / (1u64 << 30) as f64
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes")
}

/// A progress bar with throughput for writing and verifying.
pub fn flash_progress() -> impl Fn(u64, u64) {
    let bar = ProgressBar::new(0);
    let style =
        ProgressStyle::with_template("    write + verify [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    move |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
        }
    }
}
