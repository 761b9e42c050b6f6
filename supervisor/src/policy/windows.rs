//! Prewarm windows: whether one is open at an instant, and when that next changes, in the local
//! time of the spec's time zone.
//!
//! A window is wall-clock time (`01:00-05:00` means what the clock on the wall says), so on a
//! daylight-saving day it lasts an hour more or less than usual: in Europe/Berlin on the
//! spring-forward day `01:00-05:00` is open for 3 real hours, on the fall-back day for 5. Local
//! times that do not exist (the skipped hour) are never shown by the clock: a window lying
//! wholly inside that gap does not open that day, and one ending inside it closes at the jump.
//! Local times that occur twice (the repeated hour) count both times.

use std::collections::BTreeSet;

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp, ToSpan};
use kiln_spec::units::{MINUTES_PER_WEEK, Window};

const MINUTES_PER_DAY: u32 = 24 * 60;

/// How far ahead `next_change` looks: the pattern repeats weekly; two weeks and a day leave room
/// for a DST shift and for a change hidden in a skipped hour.
const HORIZON_DAYS: i64 = 15;

/// Minutes since Monday 00:00 in `tz`'s local time (0..10080), seconds dropped.
pub fn local_minute_of_week(ts: Timestamp, tz: &TimeZone) -> u32 {
    let local = ts.to_zoned(tz.clone());
    let day = u32::try_from(local.weekday().to_monday_zero_offset()).unwrap_or(0);
    let hour = u32::try_from(local.hour()).unwrap_or(0);
    let minute = u32::try_from(local.minute()).unwrap_or(0);
    day * MINUTES_PER_DAY + hour * 60 + minute
}

/// Whether any window is open at this minute of the week (spans are [start, end)).
pub fn window_open(windows: &[Window], minute_of_week: u32) -> bool {
    let m = minute_of_week % MINUTES_PER_WEEK;
    windows.iter().flat_map(Window::week_spans).any(|(start, end)| (start..end).contains(&m))
}

/// Whether the windows are open at `ts`, and when that next changes (`None`: never, as with no
/// windows or windows covering the whole week).
pub fn next_change(windows: &[Window], ts: Timestamp, tz: &TimeZone) -> (bool, Option<Timestamp>) {
    let open_at = |t: Timestamp| window_open(windows, local_minute_of_week(t, tz));
    let open = open_at(ts);
    let mut candidates = change_candidates(windows, ts, tz);
    candidates.retain(|c| *c > ts);
    // Openness is a function of the local minute, which moves smoothly except at zone
    // transitions; so it can only change at a boundary's local time or at a transition. The
    // first candidate where it differs is the change (extra candidates are harmless).
    let change = candidates.into_iter().find(|c| open_at(*c) != open);
    (open, change)
}

/// Every instant in the horizon at which the local clock shows a window boundary, plus every
/// zone transition.
fn change_candidates(windows: &[Window], ts: Timestamp, tz: &TimeZone) -> BTreeSet<Timestamp> {
    let mut out = BTreeSet::new();
    if windows.is_empty() {
        return out;
    }
    let horizon = ts.saturating_add(SignedDuration::from_hours(24 * HORIZON_DAYS)).unwrap_or(Timestamp::MAX);
    out.extend(tz.following(ts).map(|t| t.timestamp()).take_while(|t| *t <= horizon));

    let boundaries: BTreeSet<u32> = windows.iter().flat_map(|w| [w.start_min, w.end_min]).collect();
    let first_day: Date = ts.to_zoned(tz.clone()).date();
    for d in -1..=HORIZON_DAYS {
        let Ok(day) = first_day.checked_add(d.days()) else { continue };
        for &minute in &boundaries {
            let (h, m) = (minute / 60 % 24, minute % 60);
            let Ok(time) = Time::new(i8::try_from(h).unwrap_or(0), i8::try_from(m).unwrap_or(0), 0, 0) else {
                continue;
            };
            out.extend(local_instants(tz, day.to_datetime(time)));
        }
    }
    out
}

/// The instants at which the local clock shows `dt`: none in a gap, two in a fold.
fn local_instants(tz: &TimeZone, dt: DateTime) -> Vec<Timestamp> {
    let offsets = match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => vec![offset],
        AmbiguousOffset::Gap { .. } => vec![],
        AmbiguousOffset::Fold { before, after } => vec![before, after],
    };
    offsets.into_iter().filter_map(|o| o.to_timestamp(dt).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days_mask: u8, start_min: u32, end_min: u32) -> Window {
        Window { days_mask, start_min, end_min }
    }

    #[test]
    fn no_windows_never_open_never_change() {
        let ts: Timestamp = "2025-06-02T12:00:00Z".parse().unwrap();
        assert_eq!(next_change(&[], ts, &TimeZone::UTC), (false, None));
    }

    #[test]
    fn whole_week_window_is_always_open() {
        let ts: Timestamp = "2025-06-02T12:00:00Z".parse().unwrap();
        assert_eq!(next_change(&[w(0x7f, 0, 0)], ts, &TimeZone::UTC), (true, None));
    }

    #[test]
    fn minute_of_week_starts_monday() {
        // 2025-06-02 is a Monday.
        let ts: Timestamp = "2025-06-02T00:00:59Z".parse().unwrap();
        assert_eq!(local_minute_of_week(ts, &TimeZone::UTC), 0);
        let ts: Timestamp = "2025-06-08T23:59:00Z".parse().unwrap();
        assert_eq!(local_minute_of_week(ts, &TimeZone::UTC), MINUTES_PER_WEEK - 1);
    }
}
