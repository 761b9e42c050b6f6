//! Where each MiB of the board's RAM goes: the table `kiln check` prints and the sum the
//! validator holds against the board's RAM.

use std::fmt;

use crate::model::Spec;
use crate::units::{MIB, mib};

/// kilnd's own working memory besides its response cache (HTTP, queues, metadata).
pub const KILND_BASE_BYTES: u64 = 64 * MIB;

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: &'static str,
    pub bytes: u64,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub ram_bytes: u64,
    pub rows: Vec<Row>,
    /// RAM for inference workers: memory-max when set, else what is left.
    pub inference_bytes: u64,
}

impl Budget {
    pub fn of(spec: &Spec) -> Budget {
        let ram = spec.hardware.ram_bytes;
        let mut rows = vec![Row {
            name: "os",
            bytes: spec.hardware.profile.os_reserve_bytes(),
            note: "reserve for the kernel and system services (board profile)".into(),
        }];
        let kilnd = spec.cgroups.kilnd.memory_max_bytes.unwrap_or(0);
        rows.push(Row {
            name: "kilnd",
            bytes: kilnd,
            note: format!(
                "cgroups.kilnd.memory-max; holds the {} MiB response cache",
                mib(spec.cache.responses.memory_bytes)
            ),
        });
        if let Some(t) = &spec.memory.tmpfs {
            rows.push(Row { name: "hot tier", bytes: t.size_bytes, note: format!("tmpfs at {}", t.path) });
        }
        if let Some(z) = &spec.memory.zram {
            let ratio = z.algorithm.planning_ratio();
            let resident = (z.size_bytes as f64 / ratio) as u64;
            rows.push(Row {
                name: "zram",
                bytes: resident,
                note: format!("{} MiB of swap at {ratio}:1 ({})", mib(z.size_bytes), z.algorithm.as_kernel_str()),
            });
        }
        let used: u64 = rows.iter().map(|r| r.bytes).sum();
        let (inference_bytes, note) = match spec.cgroups.inference.memory_max_bytes {
            Some(m) => (m, "cgroups.inference.memory-max".to_string()),
            None => (ram.saturating_sub(used), "not limited: what is left".to_string()),
        };
        let biggest = spec.models.iter().map(|m| m.footprint_bytes()).max().unwrap_or(0);
        let note = if biggest > 0 { format!("{note}; largest model needs {} MiB", mib(biggest)) } else { note };
        rows.insert(2, Row { name: "inference", bytes: inference_bytes, note });
        Budget { ram_bytes: ram, rows, inference_bytes }
    }

    pub fn total_bytes(&self) -> u64 {
        self.rows.iter().map(|r| r.bytes).sum()
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |b: u64| if self.ram_bytes == 0 { 0.0 } else { b as f64 * 100.0 / self.ram_bytes as f64 };
        writeln!(f, "{:<10} {:>9} {:>6}  what", "RAM", "MiB", "%")?;
        for r in &self.rows {
            writeln!(f, "{:<10} {:>9} {:>5.1}%  {}", r.name, mib(r.bytes), pct(r.bytes), r.note)?;
        }
        let total = self.total_bytes();
        writeln!(f, "{:<10} {:>9} {:>5.1}%", "total", mib(total), pct(total))?;
        let free = self.ram_bytes as i128 - total as i128;
        write!(
            f,
            "{:<10} {:>9} {:>5.1}%  of {} MiB",
            "headroom",
            free / MIB as i128,
            free as f64 * 100.0 / self.ram_bytes.max(1) as f64,
            mib(self.ram_bytes)
        )
    }
}
