//! Pure translations between kiln's limits and the text of cgroup files, both ways.

use super::MemoryEvents;

/// The CFS bandwidth period kilnd uses, in microseconds (the kernel's default).
pub(crate) const CPU_PERIOD_US: u64 = 100_000;
/// cgroup v2 `cpu.weight` and `io.weight` default; v1 `cpu.shares` default.
pub(crate) const WEIGHT_DEFAULT: u32 = 100;
const SHARES_DEFAULT: u64 = 1024;
const SHARES_MIN: u64 = 2;
const SHARES_MAX: u64 = 262_144;
const BLKIO_WEIGHT_DEFAULT: u64 = 500;
const BLKIO_WEIGHT_MIN: u64 = 10;
const BLKIO_WEIGHT_MAX: u64 = 1000;
/// v1 reports "no limit" as PAGE_COUNTER_MAX pages, just under `i64::MAX` bytes whatever
/// the page size; anything from 2^62 bytes (4 EiB) up is read as unlimited.
const V1_UNLIMITED_FROM: u64 = 1 << 62;

/// A cpuset as the kernel writes it: sorted, ranges collapsed (`[0,1,2,3,6]` -> `"0-3,6"`).
pub fn cpuset_list(cpus: &[u32]) -> String {
    kiln_spec::units::format_cpuset(cpus)
}

/// CFS quota per period for a percentage of one CPU: 250% -> 250000 us per 100000 us.
pub fn cpu_quota_us(percent: u32) -> u64 {
    u64::from(percent) * CPU_PERIOD_US / 100
}

/// cgroup v2 `cpu.max`: `"250000 100000"` for 250%, `"max 100000"` for no quota.
pub fn cpu_max(quota_percent: Option<u32>) -> String {
    match quota_percent {
        Some(p) => format!("{} {CPU_PERIOD_US}", cpu_quota_us(p)),
        None => format!("max {CPU_PERIOD_US}"),
    }
}

/// A memory limit for v2 files: bytes, or `"max"` for none.
pub fn bytes_or_max(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "max".to_owned(), |b| b.to_string())
}

/// cgroup v2 `cpu.weight` (1-10000, default 100) as v1 `cpu.shares` (default 1024), the
/// same scaling systemd uses (`cgroup_cpu_weight_to_shares` in src/core/cgroup.c).
pub fn cpu_weight_to_shares(weight: u32) -> u64 {
    (u64::from(weight) * SHARES_DEFAULT / u64::from(WEIGHT_DEFAULT)).clamp(SHARES_MIN, SHARES_MAX)
}

/// cgroup v2 `io.weight` (1-10000, default 100) as v1 `blkio.weight` (10-1000, default
/// 500), as systemd's `cgroup_weight_io_to_blkio` does.
pub fn io_weight_to_blkio(weight: u32) -> u64 {
    (u64::from(weight) * BLKIO_WEIGHT_DEFAULT / u64::from(WEIGHT_DEFAULT)).clamp(BLKIO_WEIGHT_MIN, BLKIO_WEIGHT_MAX)
}

/// v1 `memory.memsw.limit_in_bytes` for kiln's limits: memory plus swap. `None` (no
/// limit) when either is unlimited.
pub fn v1_memsw_limit(memory_max: Option<u64>, swap_max: Option<u64>) -> Option<u64> {
    Some(memory_max?.saturating_add(swap_max?))
}

/// A v1 byte count, with the kernel's "no limit" value read as `None`.
pub fn v1_limit(bytes: u64) -> Option<u64> {
    (bytes < V1_UNLIMITED_FROM).then_some(bytes)
}

/// `memory.max`'s content: `None` for `"max"`.
pub fn parse_max(text: &str) -> Option<Option<u64>> {
    match text.trim() {
        "max" => Some(None),
        n => n.parse().ok().map(Some),
    }
}

/// A single-number file such as `memory.current`.
pub fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A flat-keyed file (`"key value"` per line) such as `memory.events` or
/// `memory.oom_control`. `None` if a line is not a key and a number.
pub fn parse_flat_keyed(text: &str) -> Option<Vec<(&str, u64)>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.trim().split_once(' ')?;
            Some((key, value.trim().parse().ok()?))
        })
        .collect()
}

/// cgroup v2 `memory.events`; keys this version does not know are ignored.
pub fn parse_memory_events(text: &str) -> Option<MemoryEvents> {
    let mut events = MemoryEvents::default();
    for (key, value) in parse_flat_keyed(text)? {
        match key {
            "high" => events.high = value,
            "max" => events.max = value,
            "oom" => events.oom = value,
            "oom_kill" => events.oom_kill = value,
            _ => {}
        }
    }
    Some(events)
}

/// `cgroup.procs`: one pid per line.
pub fn parse_procs(text: &str) -> Option<Vec<u32>> {
    text.split_whitespace().map(|p| p.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpusets_collapse_ranges() {
        assert_eq!(cpuset_list(&[6, 0, 1, 2, 3]), "0-3,6");
        assert_eq!(cpuset_list(&[0]), "0");
        assert_eq!(cpuset_list(&[1, 3, 5, 6]), "1,3,5-6");
        assert_eq!(cpuset_list(&[]), "");
    }

    #[test]
    fn weights_scale_like_systemd() {
        assert_eq!(cpu_weight_to_shares(100), 1024);
        assert_eq!(cpu_weight_to_shares(1), 10);
        assert_eq!(cpu_weight_to_shares(10_000), 102_400);
        assert_eq!(io_weight_to_blkio(100), 500);
        assert_eq!(io_weight_to_blkio(1), 10);
        assert_eq!(io_weight_to_blkio(10_000), 1000);
    }

    #[test]
    fn v1_unlimited_is_none() {
        assert_eq!(v1_limit(9_223_372_036_854_771_712), None);
        assert_eq!(v1_limit(9_223_372_036_854_710_272), None, "64 KiB pages");
        assert_eq!(v1_limit(64 << 20), Some(64 << 20));
        assert_eq!(v1_memsw_limit(Some(32 << 20), Some(0)), Some(32 << 20));
        assert_eq!(v1_memsw_limit(Some(32 << 20), None), None);
    }

    #[test]
    fn files_parse() {
        assert_eq!(parse_max("max\n"), Some(None));
        assert_eq!(parse_max("1024\n"), Some(Some(1024)));
        assert_eq!(parse_max("lots"), None);
        assert_eq!(parse_procs("12\n34\n"), Some(vec![12, 34]));
        assert_eq!(parse_procs(""), Some(vec![]));
        assert_eq!(
            parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").map(|v| v[2]),
            Some(("oom_kill", 2))
        );
        assert_eq!(parse_flat_keyed("oom lots\n"), None);
    }
}
