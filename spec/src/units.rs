//! Quantities as written in a spec: byte sizes (`8GiB`), durations (`30m`), percentages
//! (`60%`), rates (`50MiB/s`), CPU sets (`1-3`) and weekly time windows (`mon-fri 01:00-05:00`).
//! Parsers return a message saying what would be right; they never panic.

use std::fmt;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

const BYTE_UNITS: [(&str, u64); 9] =
    [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB), ("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB), ("B", 1)];

/// Parses `8GiB`, `4608MiB`, `1.5G` (binary units, as systemd reads them) or a plain byte count.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let hint = "write a size such as 512MiB or 8GiB";
    for decimal in ["kB", "KB", "MB", "GB", "TB"] {
        if let Some(num) = t.strip_suffix(decimal) {
            let fixed = format!("{}{}iB", num.trim(), &decimal[..1].to_uppercase());
            return Err(format!("`{t}`: decimal units are ambiguous here; kiln sizes are binary: write {fixed}"));
        }
    }
    let (num, mult) = BYTE_UNITS
        .iter()
        .find_map(|(suffix, mult)| t.strip_suffix(suffix).map(|n| (n.trim(), *mult)))
        .unwrap_or((t, 1));
    if num.is_empty() {
        return Err(format!("`{t}` is not a size; {hint}"));
    }
    let value: f64 = num.parse().map_err(|_| format!("`{t}` is not a size; {hint}"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > (u64::MAX / 2) as f64 {
        return Err(format!("`{t}` is out of range; {hint}"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!("`{t}` is not a whole number of bytes; {hint}"));
    }
    Ok(bytes as u64)
}

/// Prints bytes in the largest binary unit that divides them exactly (`4608MiB`, `8GiB`).
pub fn format_bytes(bytes: u64) -> String {
    for (suffix, mult) in &BYTE_UNITS[..4] {
        if bytes >= *mult && bytes.is_multiple_of(*mult) {
            return format!("{}{suffix}", bytes / mult);
        }
    }
    format!("{bytes}B")
}

/// Bytes as MiB for tables, rounded to the nearest MiB.
pub fn mib(bytes: u64) -> u64 {
    (bytes + MIB / 2) / MIB
}

const DURATION_UNITS: [(&str, u64); 5] = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1), ("ms", 0)];

/// Parses `30m`, `24h`, `1h30m`, `90s`, `7d` or a plain number of seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("`{t}` is not a duration; write one such as 90s, 30m, 24h or 1h30m");
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(secs);
    }
    let mut total: u64 = 0;
    let mut rest = t;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let after = &rest[digits..];
        let unit_len = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let unit = &after[..unit_len];
        let secs = DURATION_UNITS.iter().find(|(u, _)| *u == unit).map(|(_, s)| *s).ok_or_else(bad)?;
        if secs == 0 {
            return Err(format!("`{t}`: durations here are whole seconds; write at least 1s"));
        }
        total = n.checked_mul(secs).and_then(|x| total.checked_add(x)).ok_or_else(bad)?;
        rest = &after[unit_len..];
    }
    Ok(total)
}

/// Prints seconds in the form `1h30m`, `30m`, `24h`, `0s`.
pub fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, size) in &DURATION_UNITS[..4] {
        if rest >= *size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// Parses `60%` (or a bare `60`) into a fraction of 100, between 0 and 100.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let num = t.strip_suffix('%').unwrap_or(t).trim();
    match num.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        Ok(_) => Err(format!("`{t}` is not between 0% and 100%")),
        Err(_) => Err(format!("`{t}` is not a percentage; write one such as 70%")),
    }
}

/// Parses a rate such as `50MiB/s` into bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let size = t.strip_suffix("/s").ok_or_else(|| format!("`{t}` is not a rate; write one such as 50MiB/s"))?;
    parse_bytes(size).map_err(|e| format!("{e} per second, such as 50MiB/s"))
}

/// Parses a cpuset such as `1-3` or `0,2-3` into sorted CPU numbers.
pub fn parse_cpuset(text: &str) -> Result<Vec<u32>, String> {
    let t = text.trim();
    let bad = || format!("`{t}` is not a CPU list; write one such as 1-3 or 0,2-3");
    let mut cpus = Vec::new();
    for part in t.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: u32 = a.trim().parse().map_err(|_| bad())?;
        let b: u32 = b.trim().parse().map_err(|_| bad())?;
        if a > b || b > 1023 {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Prints CPU numbers as a cpuset, the form the kernel and the spec use: `[0,1,2,5]` -> `0-2,5`.
pub fn format_cpuset(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

/// Days of the week, Monday first, as cron and systemd name them.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_DAY: u32 = 24 * 60;
pub const MINUTES_PER_WEEK: u32 = 7 * MINUTES_PER_DAY;

/// A daily time window in local time, on some weekdays; it may cross midnight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bit i set = the window starts on WEEKDAYS[i].
    pub days_mask: u8,
    pub start_min: u32,
    pub end_min: u32,
}

impl Window {
    pub fn crosses_midnight(&self) -> bool {
        self.end_min <= self.start_min
    }
    pub fn length_min(&self) -> u32 {
        if self.crosses_midnight() {
            MINUTES_PER_DAY - self.start_min + self.end_min
        } else {
            self.end_min - self.start_min
        }
    }
    /// The window's spans as [start, end) minutes of the week (Monday 00:00 = 0), split at the week's end.
    pub fn week_spans(&self) -> Vec<(u32, u32)> {
        let mut spans = Vec::new();
        for day in 0..7u32 {
            if self.days_mask & (1 << day) == 0 {
                continue;
            }
            let start = day * MINUTES_PER_DAY + self.start_min;
            let end = start + self.length_min();
            if end > MINUTES_PER_WEEK {
                spans.push((start, MINUTES_PER_WEEK));
                spans.push((0, end - MINUTES_PER_WEEK));
            } else {
                spans.push((start, end));
            }
        }
        spans
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days_mask != 0x7f {
            let days: Vec<&str> = (0..7).filter(|d| self.days_mask & (1 << d) != 0).map(|d| WEEKDAYS[d]).collect();
            write!(f, "{} ", days.join(","))?;
        }
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        let end = if self.end_min == 0 { MINUTES_PER_DAY } else { self.end_min };
        write!(f, "{}-{}", hm(self.start_min), hm(end))
    }
}

fn parse_hhmm(t: &str) -> Option<u32> {
    let (h, m) = t.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) => Some(MINUTES_PER_DAY),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

fn parse_days(t: &str) -> Result<u8, String> {
    let day = |d: &str| {
        WEEKDAYS.iter().position(|w| w.eq_ignore_ascii_case(d.trim())).ok_or_else(|| {
            let hint = crate::diag::did_you_mean(&d.trim().to_lowercase(), WEEKDAYS)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            format!("`{}` is not a weekday{hint}; use mon, tue, wed, thu, fri, sat, sun", d.trim())
        })
    };
    let mut mask = 0u8;
    for part in t.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => mask |= 1 << day(part)?,
        }
    }
    Ok(mask)
}

/// Parses `01:00-05:00`, `23:00-02:00` (crosses midnight) or `sat,sun 02:00-06:00`.
pub fn parse_window(text: &str) -> Result<Window, String> {
    let t = text.trim();
    let (days, times) = match t.rsplit_once(' ') {
        Some((d, times)) => (parse_days(d)?, times),
        None => (0x7f, t),
    };
    let bad = || {
        format!(
            "`{t}` is not a window; write HH:MM-HH:MM in local time, optionally after weekdays: `sat,sun 01:00-05:00`"
        )
    };
    let (a, b) = times.split_once('-').ok_or_else(bad)?;
    let start_min = parse_hhmm(a.trim()).ok_or_else(bad)?;
    let end_min = parse_hhmm(b.trim()).ok_or_else(bad)?;
    if start_min == MINUTES_PER_DAY {
        return Err(bad());
    }
    if start_min == end_min {
        return Err(format!("`{t}` starts and ends at the same time; a window needs a length"));
    }
    let end_min = if end_min == MINUTES_PER_DAY { 0 } else { end_min };
    Ok(Window { days_mask: days, start_min, end_min })
}
