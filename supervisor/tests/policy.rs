//! The policies as pure functions: windows across midnight, the week's end and DST; pressure
//! hysteresis; eviction invariants; prewarm order; admission numbers; the model state machine.
//! Time moves by hand (`ManualClock`, fixed timestamps): nothing sleeps.

// Helpers outside `#[test]` fns unwrap fixtures too; a bad fixture should fail loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use kiln_spec::units::{MIB, parse_window};
use kiln_supervisor::policy::*;
use proptest::prelude::*;

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn tz(name: &str) -> TimeZone {
    TimeZone::get(name).unwrap_or_else(|e| panic!("time zone {name} (is tzdata installed?): {e}"))
}

mod windows {
    use super::*;

    fn open(spec: &[&str], at: &str, zone: &TimeZone) -> bool {
        let windows: Vec<_> = spec.iter().map(|w| parse_window(w).unwrap()).collect();
        window_open(&windows, local_minute_of_week(ts(at), zone))
    }

    #[test]
    fn open_table() {
        let utc = TimeZone::UTC;
        // 2025-06-02 is a Monday, 2025-06-08 a Sunday.
        let cases: &[(&[&str], &str, bool)] = &[
            (&["01:00-05:00"], "2025-06-02T00:59:59Z", false),
            (&["01:00-05:00"], "2025-06-02T01:00:00Z", true),
            (&["01:00-05:00"], "2025-06-02T04:59:59Z", true),
            (&["01:00-05:00"], "2025-06-02T05:00:00Z", false),
            (&["23:00-02:00"], "2025-06-03T23:30:00Z", true),
            (&["23:00-02:00"], "2025-06-04T01:59:00Z", true),
            (&["23:00-02:00"], "2025-06-04T02:00:00Z", false),
            (&["22:00-24:00"], "2025-06-04T23:59:00Z", true),
            (&["22:00-24:00"], "2025-06-05T00:00:00Z", false),
            // Starts on Sunday, crosses the week's end into Monday.
            (&["sun 22:00-02:00"], "2025-06-08T23:00:00Z", true),
            (&["sun 22:00-02:00"], "2025-06-09T01:30:00Z", true),
            (&["sun 22:00-02:00"], "2025-06-09T22:30:00Z", false),
            (&["sun 22:00-02:00"], "2025-06-08T01:30:00Z", false),
            // A Friday-night window belongs to Friday even after midnight.
            (&["fri 23:00-03:00"], "2025-06-07T02:00:00Z", true),
            (&["fri 23:00-03:00"], "2025-06-06T02:00:00Z", false),
            (&["sat,sun 01:00-05:00"], "2025-06-07T02:00:00Z", true),
            (&["sat,sun 01:00-05:00"], "2025-06-06T02:00:00Z", false),
            (&["mon-fri 03:00-05:00", "sat,sun 02:00-07:00"], "2025-06-08T06:00:00Z", true),
            (&["mon-fri 03:00-05:00", "sat,sun 02:00-07:00"], "2025-06-09T06:00:00Z", false),
            (&[], "2025-06-09T06:00:00Z", false),
        ];
        for (spec, at, want) in cases {
            assert_eq!(open(spec, at, &utc), *want, "{spec:?} at {at}");
        }
        // Local time, not UTC: 01:30 in Berlin is 23:30Z the day before in summer.
        assert!(open(&["01:00-05:00"], "2025-06-02T23:30:00Z", &tz("Europe/Berlin")));
    }

    fn change(spec: &[&str], at: &str, zone: &str) -> (bool, Option<Timestamp>) {
        let windows: Vec<_> = spec.iter().map(|w| parse_window(w).unwrap()).collect();
        next_change(&windows, ts(at), &tz(zone))
    }

    /// Windows, instant, zone, and the expected (open, next change).
    type ChangeCase<'a> = (&'a [&'a str], &'a str, &'a str, (bool, Option<Timestamp>));

    #[test]
    fn next_change_table() {
        let some = |t: &str| Some(ts(t));
        let cases: &[ChangeCase] = &[
            (&["01:00-05:00"], "2025-06-02T12:00:00Z", "UTC", (false, some("2025-06-03T01:00:00Z"))),
            (&["01:00-05:00"], "2025-06-02T01:00:00Z", "UTC", (true, some("2025-06-02T05:00:00Z"))),
            (&["sun 22:00-02:00"], "2025-06-05T12:00:00Z", "UTC", (false, some("2025-06-08T22:00:00Z"))),
            (&["sun 22:00-02:00"], "2025-06-08T23:00:00Z", "UTC", (true, some("2025-06-09T02:00:00Z"))),
            (&["sat,sun 01:00-05:00"], "2025-06-06T12:00:00Z", "UTC", (false, some("2025-06-07T01:00:00Z"))),
            // Adjacent windows are one open stretch.
            (&["22:00-24:00", "00:00-03:00"], "2025-06-02T22:30:00Z", "UTC", (true, some("2025-06-03T03:00:00Z"))),
            // Europe/Berlin, spring forward on 2025-03-30 (02:00 CET -> 03:00 CEST): 3 real hours.
            (&["01:00-05:00"], "2025-03-29T23:30:00Z", "Europe/Berlin", (false, some("2025-03-30T00:00:00Z"))),
            (&["01:00-05:00"], "2025-03-30T00:30:00Z", "Europe/Berlin", (true, some("2025-03-30T03:00:00Z"))),
            // Ending inside the skipped hour: closes at the jump.
            (&["01:00-02:30"], "2025-03-30T00:30:00Z", "Europe/Berlin", (true, some("2025-03-30T01:00:00Z"))),
            // Wholly inside the skipped hour: does not open that day.
            (&["02:00-02:30"], "2025-03-29T23:30:00Z", "Europe/Berlin", (false, some("2025-03-31T00:00:00Z"))),
            // Europe/Berlin, fall back on 2025-10-26 (03:00 CEST -> 02:00 CET): 5 real hours.
            (&["01:00-05:00"], "2025-10-25T22:30:00Z", "Europe/Berlin", (false, some("2025-10-25T23:00:00Z"))),
            (&["01:00-05:00"], "2025-10-25T23:30:00Z", "Europe/Berlin", (true, some("2025-10-26T04:00:00Z"))),
            // America/New_York, spring forward on 2025-03-09 (02:00 EST -> 03:00 EDT).
            (&["01:00-05:00"], "2025-03-09T05:30:00Z", "America/New_York", (false, some("2025-03-09T06:00:00Z"))),
            (&["01:00-05:00"], "2025-03-09T06:30:00Z", "America/New_York", (true, some("2025-03-09T09:00:00Z"))),
            (&["02:00-02:30"], "2025-03-09T05:00:00Z", "America/New_York", (false, some("2025-03-10T06:00:00Z"))),
            // America/New_York, fall back on 2025-11-02 (02:00 EDT -> 01:00 EST).
            (&["01:00-05:00"], "2025-11-02T05:30:00Z", "America/New_York", (true, some("2025-11-02T10:00:00Z"))),
            // Inside the repeated hour: open twice.
            (&["01:00-01:30"], "2025-11-02T05:10:00Z", "America/New_York", (true, some("2025-11-02T05:30:00Z"))),
            (&["01:00-01:30"], "2025-11-02T05:40:00Z", "America/New_York", (false, some("2025-11-02T06:00:00Z"))),
            (&["01:00-01:30"], "2025-11-02T06:10:00Z", "America/New_York", (true, some("2025-11-02T06:30:00Z"))),
        ];
        for (spec, at, zone, want) in cases {
            assert_eq!(change(spec, at, zone), *want, "{spec:?} at {at} in {zone}");
        }
    }

    fn arb_window() -> impl Strategy<Value = kiln_spec::units::Window> {
        (1u8..=127, 0u32..1440, 0u32..1440).prop_map(|(days_mask, start_min, end_min)| kiln_spec::units::Window {
            days_mask,
            start_min,
            end_min,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The reported state holds until the reported change, and differs right at it.
        #[test]
        fn next_change_is_the_first_change(
            windows in prop::collection::vec(arb_window(), 0..4),
            // 2025, so both DST switches of both zones are in range.
            start in 1_735_689_600i64..1_767_225_600,
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York"]),
            probes in prop::collection::vec(0.0f64..1.0, 40),
        ) {
            let zone = tz(zone);
            let start = Timestamp::from_second(start).unwrap();
            let open_at = |t: Timestamp| window_open(&windows, local_minute_of_week(t, &zone));
            let (open, change) = next_change(&windows, start, &zone);
            prop_assert_eq!(open, open_at(start));
            let span_secs = match change {
                Some(at) => {
                    prop_assert!(at > start);
                    prop_assert_ne!(open_at(at), open);
                    at.duration_since(start).as_secs()
                }
                None => 8 * 86_400,
            };
            for p in probes {
                let t = Timestamp::from_second(start.as_second() + (p * span_secs as f64) as i64).unwrap();
                if change.is_none_or(|at| t < at) {
                    prop_assert_eq!(open_at(t), open, "at {}", t);
                }
            }
        }
    }
}

mod pressure {
    use super::*;

    const TOTAL: u64 = 1_000_000;

    fn reading(used_pct: f64, psi: Option<f64>) -> MemReading {
        let used = (used_pct / 100.0 * TOTAL as f64).round() as u64;
        MemReading { total_bytes: TOTAL, available_bytes: TOTAL - used, psi_some_avg10: psi }
    }

    #[test]
    fn levels_rise_at_once_and_fall_after_the_margin() {
        use Level::*;
        let mut tracker = PressureTracker::new(Thresholds::default());
        let steps: &[(f64, Option<f64>, Level)] = &[
            (50.0, None, Normal),
            (60.0, None, Warn),
            (56.0, None, Warn),
            (54.9, None, Normal),
            (97.0, None, Emergency),
            (91.0, None, Emergency),
            (89.0, None, Evict),
            (66.0, None, Evict),
            (64.0, None, Warn),
            (40.0, Some(12.0), Evict),
            (40.0, Some(6.0), Evict),
            (40.0, Some(4.0), Normal),
            (40.0, Some(10.0), Normal),
            (71.0, Some(0.0), Evict),
        ];
        for (i, (used, psi, want)) in steps.iter().enumerate() {
            assert_eq!(tracker.update(reading(*used, *psi)), *want, "step {i}: {used}% psi {psi:?}");
        }
    }

    #[test]
    fn a_reading_without_total_keeps_the_level() {
        let mut tracker = PressureTracker::new(Thresholds::default());
        tracker.update(reading(80.0, None));
        let broken = MemReading { total_bytes: 0, available_bytes: 0, psi_some_avg10: None };
        assert_eq!(tracker.update(broken), Level::Evict);
    }

    proptest! {
        /// Entering is immediate, leaving needs the margin: whatever came before.
        #[test]
        fn level_bounds_hold_after_any_history(used in prop::collection::vec(0.0f64..100.0, 1..60)) {
            let t = Thresholds::default();
            let mut tracker = PressureTracker::new(t);
            for u in used {
                let level = tracker.update(reading(u, None));
                for l in [Level::Warn, Level::Evict, Level::Emergency] {
                    let entry = t.entry_pct(l).unwrap();
                    if u >= entry + 0.01 { prop_assert!(level >= l, "{u}% gave {level:?}"); }
                    if u < entry - t.hysteresis_pct - 0.01 { prop_assert!(level < l, "{u}% gave {level:?}"); }
                }
            }
        }

        /// Hovering within the margin around a threshold, once in, never flaps out.
        #[test]
        fn no_flapping_around_a_threshold(
            which in prop::sample::select(vec![Level::Warn, Level::Evict, Level::Emergency]),
            offsets in prop::collection::vec(-4.9f64..4.9, 1..80),
        ) {
            let t = Thresholds::default();
            let entry = t.entry_pct(which).unwrap();
            let mut tracker = PressureTracker::new(t);
            prop_assert_eq!(tracker.update(reading(entry.min(99.9) + 0.05, None)), which);
            for o in offsets {
                let u = entry + o;
                prop_assert_eq!(tracker.update(reading(u, None)), which, "{}%", u);
            }
        }
    }

    #[test]
    fn meminfo_parses_to_bytes() {
        let text = "MemTotal:        8039796 kB\nMemFree:          512000 kB\nMemAvailable:    6000000 kB\n";
        let r = parse_meminfo(text).unwrap();
        assert_eq!((r.total_bytes, r.available_bytes), (8039796 * 1024, 6000000 * 1024));
        assert!((r.used_pct() - 25.37).abs() < 0.01);
        let err = parse_meminfo("MemTotal: 10 kB\n").unwrap_err();
        assert_eq!(err.to_string(), "/proc/meminfo: no `MemAvailable` line");
        let err = parse_meminfo("MemTotal: ten kB\nMemAvailable: 1 kB").unwrap_err();
        assert_eq!(err.to_string(), "/proc/meminfo: cannot read `MemTotal: ten kB`: not a number");
    }

    #[test]
    fn psi_parses_some_and_full() {
        let text = "some avg10=12.50 avg60=3.10 avg300=0.80 total=123456\n\
                    full avg10=1.00 avg60=0.50 avg300=0.10 total=6543\n";
        let psi = parse_psi(text).unwrap();
        assert_eq!(psi.some, PsiLine { avg10: 12.5, avg60: 3.1, avg300: 0.8, total_us: 123456 });
        assert_eq!(psi.full.unwrap().total_us, 6543);
        assert_eq!(parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0").unwrap().full, None);
        assert!(parse_psi("full avg10=0.00 avg60=0.00 avg300=0.00 total=0").is_err());
        assert!(parse_psi("some avg10=x avg60=0.00 avg300=0.00 total=0").is_err());
        assert!(parse_psi("some avg10=0.00").is_err());
    }
}

mod evict {
    use super::*;

    const GIB: u64 = 1024 * MIB;

    fn model(id: &str, size_mib: u64, footprint_mib: u64) -> ModelView {
        ModelView::new(id, size_mib * MIB, footprint_mib * MIB)
    }

    fn loaded(id: &str, size_mib: u64, footprint_mib: u64, last_used: Timestamp) -> ModelView {
        ModelView { loaded: true, last_used: Some(last_used), ..model(id, size_mib, footprint_mib) }
    }

    /// 10000 MiB of RAM with `used_mib` in use.
    fn memory(used_mib: u64) -> MemReading {
        MemReading { total_bytes: 10_000 * MIB, available_bytes: (10_000 - used_mib) * MIB, psi_some_avg10: None }
    }

    fn input<'a>(models: &'a [ModelView], gds: &'a GdsState, now: Timestamp) -> EvictInput<'a> {
        EvictInput {
            models,
            memory: memory(3000),
            level: Level::Normal,
            thresholds: Thresholds::default(),
            hot_budget_bytes: 4 * GIB,
            hot_used_bytes: 0,
            hot_wanted_bytes: 0,
            keep_alive_secs: 1800,
            policy: EvictionPolicy::GreedyDualSize,
            gds,
            now,
        }
    }

    fn ids(plan: &EvictPlan) -> Vec<(&str, Action)> {
        plan.decisions.iter().map(|d| (d.id.as_str(), d.action)).collect()
    }

    #[test]
    fn keep_alive_counts_from_the_last_request_with_a_manual_clock() {
        let clock = ManualClock::new(ts("2025-06-02T12:00:00Z"));
        let t0 = clock.now();
        let long_ago = ts("2025-06-01T12:00:00Z");
        let models = [
            loaded("idle", 100, 200, t0),
            ModelView { in_use: 1, ..loaded("busy", 100, 200, long_ago) },
            ModelView { pinned: true, ..loaded("pinned", 100, 200, long_ago) },
        ];
        let gds = GdsState::default();
        clock.advance(Duration::from_secs(1799));
        assert_eq!(plan_evictions(&input(&models, &gds, clock.now())).decisions, vec![]);
        clock.advance(Duration::from_secs(1));
        let plan = plan_evictions(&input(&models, &gds, clock.now()));
        assert_eq!(
            plan.decisions,
            vec![Decision { id: "idle".into(), action: Action::Unload, reason: Reason::KeepAliveExpired }]
        );
        assert_eq!(plan.decisions[0].to_string(), "unload idle: idle past its keep-alive");
    }

    /// LRU drops the least recently used; GreedyDual-Size drops the cheapest per MiB to reload.
    #[test]
    fn gds_and_lru_choose_differently() {
        let now = ts("2025-06-02T12:00:00Z");
        let big_cheap = ModelView {
            reload_cost_ms_from_store: 3000.0, // 1.5 ms per MiB of footprint
            ..loaded("big-cheap", 1500, 2000, ts("2025-06-02T11:59:00Z"))
        };
        let small_dear = ModelView {
            reload_cost_ms_from_store: 4000.0, // 6.7 ms per MiB
            ..loaded("small-dear", 400, 600, ts("2025-06-02T11:50:00Z"))
        };
        let models = [big_cheap, small_dear];
        let gds = GdsState::default();
        // 70% used: free enough to fall under 65%.
        let base = EvictInput { memory: memory(7000), level: Level::Evict, ..input(&models, &gds, now) };
        let lru = plan_evictions(&EvictInput { policy: EvictionPolicy::Lru, ..base.clone() });
        assert_eq!(ids(&lru), vec![("small-dear", Action::Unload)]);
        assert_eq!(lru.decisions[0].reason, Reason::MemoryPressure(Level::Evict));
        let gds_plan = plan_evictions(&base);
        assert_eq!(ids(&gds_plan), vec![("big-cheap", Action::Unload)]);
        // The classic inflation: L rises to the evicted credit.
        assert!((gds_plan.gds.loaded.inflation() - 1.5).abs() < 1e-9);
    }

    #[test]
    fn gds_inflation_favours_models_touched_since() {
        let now = ts("2025-06-02T12:00:00Z");
        let mut gds = GdsState::default();
        gds.loaded.evicted("gone", 10.0); // L = 10
        gds.touch("recent");
        let m = |id: &str| ModelView { reload_cost_ms_from_store: 1000.0, ..loaded(id, 500, 1000, now) };
        let models = [m("recent"), m("stale")];
        let plan =
            plan_evictions(&EvictInput { memory: memory(7000), level: Level::Evict, ..input(&models, &gds, now) });
        assert_eq!(ids(&plan), vec![("stale", Action::Unload)]);
    }

    #[test]
    fn priority_breaks_ties_higher_stays() {
        let now = ts("2025-06-02T12:00:00Z");
        let models = [
            ModelView { priority: 5, ..loaded("high", 500, 1000, now) },
            ModelView { priority: -1, ..loaded("low", 500, 1000, now) },
        ];
        let gds = GdsState::default();
        for policy in [EvictionPolicy::Lru, EvictionPolicy::GreedyDualSize] {
            let i = EvictInput { memory: memory(7000), level: Level::Evict, policy, ..input(&models, &gds, now) };
            assert_eq!(ids(&plan_evictions(&i)), vec![("low", Action::Unload)], "{policy:?}");
        }
    }

    #[test]
    fn hot_budget_demotes_idle_unpinned_copies_only() {
        let now = ts("2025-06-02T12:00:00Z");
        let hot = |id: &str, last: &str| ModelView { hot: true, last_used: Some(ts(last)), ..model(id, 1000, 1200) };
        let models = [
            hot("old", "2025-06-01T00:00:00Z"),
            hot("newer", "2025-06-02T00:00:00Z"),
            hot("newest", "2025-06-02T11:00:00Z"),
            ModelView { pinned: true, ..hot("pinned", "2025-05-01T00:00:00Z") },
            ModelView { loaded: true, in_use: 1, ..hot("mapped", "2025-05-01T00:00:00Z") },
        ];
        let gds = GdsState::default();
        let i = EvictInput {
            policy: EvictionPolicy::Lru,
            hot_budget_bytes: 4000 * MIB,
            hot_used_bytes: 5000 * MIB,
            hot_wanted_bytes: 500 * MIB,
            ..input(&models, &gds, now)
        };
        let plan = plan_evictions(&i);
        assert_eq!(ids(&plan), vec![("old", Action::DemoteHot), ("newer", Action::DemoteHot)]);
        let reason = Reason::HotBudget { needed_bytes: 5500 * MIB, budget_bytes: 4000 * MIB };
        assert_eq!(plan.decisions[0].reason, reason);
        assert_eq!(reason.to_string(), "the hot tier needs 5500 MiB but its budget is 4000 MiB");
    }

    #[test]
    fn emergency_unloads_every_unpinned_idle_model() {
        let now = ts("2025-06-02T12:00:00Z");
        let models = [
            loaded("a", 100, 200, now),
            ModelView { hot: true, ..loaded("b", 100, 200, now) },
            ModelView { hot: true, ..model("c", 100, 200) },
            ModelView { pinned: true, hot: true, ..loaded("pin", 100, 200, now) },
            ModelView { in_use: 2, ..loaded("busy", 100, 200, now) },
        ];
        let gds = GdsState::default();
        let plan =
            plan_evictions(&EvictInput { memory: memory(9600), level: Level::Emergency, ..input(&models, &gds, now) });
        let mut got = ids(&plan);
        got.sort_by_key(|(id, _)| *id);
        assert_eq!(got, vec![("a", Action::Unload), ("b", Action::Unload), ("c", Action::DemoteHot)]);
        assert!(plan.decisions.iter().all(|d| d.reason == Reason::Emergency));
    }

    #[test]
    fn psi_alone_unloads_one_model_per_round() {
        let now = ts("2025-06-02T12:00:00Z");
        let models = [loaded("a", 100, 200, now), loaded("b", 100, 200, now)];
        let gds = GdsState::default();
        let plan =
            plan_evictions(&EvictInput { memory: memory(3000), level: Level::Evict, ..input(&models, &gds, now) });
        assert_eq!(plan.decisions.len(), 1);
    }

    #[test]
    fn unloading_a_hot_model_frees_only_kv_and_compute() {
        let now = ts("2025-06-02T12:00:00Z");
        // Needs 501 MiB freed: the hot model gives back 300, so the cold one goes too.
        let models = [
            ModelView { hot: true, ..loaded("hot", 1000, 1300, ts("2025-06-02T11:00:00Z")) },
            loaded("cold", 100, 300, now),
        ];
        let gds = GdsState::default();
        let i = EvictInput {
            memory: memory(7000),
            level: Level::Evict,
            policy: EvictionPolicy::Lru,
            ..input(&models, &gds, now)
        };
        assert_eq!(ids(&plan_evictions(&i)), vec![("hot", Action::Unload), ("cold", Action::Unload)]);
    }

    fn arb_model() -> impl Strategy<Value = ModelView> {
        (
            (1u64..2048, 0u64..1024, any::<bool>(), -2i32..3, any::<bool>(), any::<bool>()),
            (
                prop::sample::select(vec![0u32, 0, 0, 1, 3]),
                prop::option::of(0i64..86_400),
                0.0f64..20_000.0,
                0.0..5_000.0,
            ),
        )
            .prop_map(|((size, extra, pinned, priority, hot, loaded), (in_use, ago, store_ms, hot_ms))| {
                ModelView {
                    id: String::new(),
                    size_bytes: size * MIB,
                    footprint_bytes: (size + extra) * MIB,
                    pinned,
                    priority,
                    hot,
                    loaded,
                    in_use: if loaded { in_use } else { 0 },
                    last_used: ago.map(|a| Timestamp::from_second(1_750_000_000 - a).unwrap()),
                    reload_cost_ms_from_store: store_ms,
                    reload_cost_ms_from_hot: hot_ms,
                }
            })
    }

    proptest! {
        #[test]
        fn eviction_invariants(
            mut models in prop::collection::vec(arb_model(), 0..10),
            used_pct in 0u64..=100,
            level in prop::sample::select(vec![Level::Normal, Level::Warn, Level::Evict, Level::Emergency]),
            budget_mib in 0u64..8192,
            wanted_mib in 0u64..2048,
            keep_alive_secs in 0u64..7200,
            lru in any::<bool>(),
        ) {
            for (i, m) in models.iter_mut().enumerate() { m.id = format!("m{i}"); }
            let gds = GdsState::default();
            let hot_used: u64 = models.iter().filter(|m| m.hot).map(|m| m.size_bytes).sum();
            let total = 16 * GIB;
            let i = EvictInput {
                models: &models,
                memory: MemReading { total_bytes: total, available_bytes: total - total * used_pct / 100, psi_some_avg10: None },
                level,
                thresholds: Thresholds::default(),
                hot_budget_bytes: budget_mib * MIB,
                hot_used_bytes: hot_used,
                hot_wanted_bytes: wanted_mib * MIB,
                keep_alive_secs,
                policy: if lru { EvictionPolicy::Lru } else { EvictionPolicy::GreedyDualSize },
                gds: &gds,
                now: Timestamp::from_second(1_750_000_000).unwrap(),
            };
            let plan = plan_evictions(&i);
            let find = |id: &str| models.iter().find(|m| m.id == id).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            let mut used = i.memory.used_bytes();
            let target = i.thresholds.evict_target_pct();
            let pct = |b: u64| 100.0 * b as f64 / total as f64;
            for (n, d) in plan.decisions.iter().enumerate() {
                let m = find(&d.id);
                // No overshoot: each pressure unload was still needed (or is PSI's one per round).
                if let Reason::MemoryPressure(_) = d.reason {
                    prop_assert!(pct(used) >= target || n == 0, "{} unloaded at {:.1}%", d.id, pct(used));
                }
                prop_assert!(seen.insert(d.id.clone()), "{} decided twice", d.id);
                prop_assert_eq!(m.in_use, 0, "{} is in use", d.id);
                prop_assert!(!m.pinned, "{} is pinned", d.id);
                match d.action {
                    Action::Unload => { prop_assert!(m.loaded); used = used.saturating_sub(m.unload_frees_bytes()); }
                    Action::DemoteHot => { prop_assert!(m.hot && !m.loaded); used = used.saturating_sub(m.size_bytes); }
                }
                if let Reason::MemoryPressure(_) = d.reason { prop_assert_eq!(level, Level::Evict); }
                if d.reason == Reason::Emergency { prop_assert_eq!(level, Level::Emergency); }
            }
            // At Evict, usage ends under the target whenever freeing every candidate could get it there.
            let eligible = models.iter().filter(|m| m.in_use == 0 && !m.pinned);
            let freeable: u64 = eligible.map(|m| if m.loaded { m.unload_frees_bytes() } else if m.hot { m.size_bytes } else { 0 }).sum();
            if level == Level::Evict && pct(i.memory.used_bytes().saturating_sub(freeable)) < target {
                prop_assert!(pct(used) < target, "still at {:.1}%", pct(used));
            }
        }
    }
}

mod prewarm {
    use super::*;

    #[test]
    fn pins_first_then_demand_within_the_budget() {
        let utc = TimeZone::UTC;
        let mut demand = Demand::default();
        let at_3am = ts("2025-06-02T03:10:00Z");
        for (id, n) in [("a", 5), ("b", 1), ("c", 10), ("unlisted", 50)] {
            for _ in 0..n {
                demand.record(id, at_3am, &utc);
            }
        }
        demand.record("b", ts("2025-06-02T15:00:00Z"), &utc); // another hour: does not count at 3
        let m = |id: &str, size_mib: u64| ModelView::new(id, size_mib * MIB, size_mib * MIB);
        let models = [
            m("a", 200),
            m("b", 200),
            ModelView { hot: true, ..m("c", 200) },
            m("unlisted", 10),
            m("tiny", 10),
            ModelView { pinned: true, priority: 1, ..m("pin-low", 100) },
            ModelView { pinned: true, priority: 5, ..m("pin-high", 100) },
        ];
        // Pins are prewarmed whether listed or not.
        let configured: Vec<String> = ["tiny", "b", "a", "c"].map(String::from).into();
        let order = |budget_mib: u64| prewarm_order(&models, &configured, &demand, 3, budget_mib * MIB, 200 * MIB);
        assert_eq!(order(1000), ["pin-high", "pin-low", "a", "b", "tiny"]);
        // b no longer fits: the order stops there rather than let `tiny` overtake it.
        assert_eq!(order(750), ["pin-high", "pin-low", "a"]);
        assert_eq!(order(250), Vec::<String>::new());
        // At another hour b's demand leads.
        assert_eq!(prewarm_order(&models, &configured, &demand, 15, GIB, 0)[2], "b");
    }

    const GIB: u64 = 1024 * MIB;
}

mod admit {
    use super::*;

    fn smollm2() -> Footprint {
        Footprint { weights_bytes: 94 * MIB, kv_bytes: 45 * MIB, repacked_bytes: 0, compute_bytes: 64 * MIB }
    }

    #[test]
    fn refusal_carries_the_numbers() {
        let err = admit("smollm2", smollm2(), Some(1024 * MIB), 844 * MIB, Level::Normal).unwrap_err();
        assert_eq!(
            err,
            Refusal::NoRoom {
                model: "smollm2".into(),
                footprint: smollm2(),
                left_bytes: 180 * MIB,
                memory_max_bytes: 1024 * MIB
            }
        );
        assert_eq!(
            err.to_string(),
            "smollm2 needs 203 MiB (weights 94 + KV 45 + compute 64) but the inference cgroup has 180 MiB \
             left of 1024 MiB (retry once running requests finish, or unload an idle model)"
        );
        assert_eq!(err.retry_after_secs(), Some(NO_ROOM_RETRY_AFTER_SECS));
    }

    #[test]
    fn admission_table() {
        let f = smollm2();
        assert_eq!(admit("m", f, Some(1024 * MIB), 821 * MIB, Level::Normal), Ok(()));
        assert_eq!(admit("m", f, Some(1024 * MIB), 0, Level::Evict), Ok(()));
        assert_eq!(admit("m", f, None, u64::MAX, Level::Warn), Ok(()));
        let emergency = admit("m", f, None, 0, Level::Emergency).unwrap_err();
        assert_eq!(emergency.retry_after_secs(), Some(EMERGENCY_RETRY_AFTER_SECS));
        assert_eq!(
            emergency.to_string(),
            format!(
                "refusing to load m: memory use is at the emergency threshold; retry in {EMERGENCY_RETRY_AFTER_SECS} s"
            )
        );
        let never = admit("m", f, Some(200 * MIB), 0, Level::Emergency).unwrap_err();
        assert_eq!(never.retry_after_secs(), None);
        assert_eq!(
            never.to_string(),
            "m needs 203 MiB (weights 94 + KV 45 + compute 64) but the inference cgroup's memory.max is 200 MiB \
             (raise cgroups.inference.memory-max or lower the model's context)"
        );
    }

    #[test]
    fn make_room_unloads_idle_unpinned_models_cheapest_first() {
        let at = |t: &str| Some(ts(t));
        let l = |id: &str, mib: u64, last: &str| ModelView {
            loaded: true,
            last_used: at(last),
            ..ModelView::new(id, mib * MIB, mib * MIB)
        };
        let models = [
            l("old", 300, "2025-06-02T08:00:00Z"),
            l("mid", 300, "2025-06-02T09:00:00Z"),
            l("new", 300, "2025-06-02T10:00:00Z"),
            ModelView { pinned: true, ..l("pin", 300, "2025-06-01T00:00:00Z") },
            ModelView { in_use: 1, ..l("busy", 300, "2025-06-01T00:00:00Z") },
        ];
        let gds = GdsState::default();
        let room = |need_mib: u64| {
            make_room(&models, "x", need_mib * MIB, Some(1600 * MIB), 1500 * MIB, EvictionPolicy::Lru, &gds)
                .map(|p| p.decisions.into_iter().map(|d| d.id).collect::<Vec<_>>())
        };
        assert_eq!(room(100), Some(vec![]));
        assert_eq!(room(500), Some(vec!["old".to_string(), "mid".to_string()]));
        assert_eq!(room(1001), None);
    }
}

mod state {
    use super::*;
    use ModelState as S;

    fn all_mapped() -> [Mapped; 3] {
        [Mapped::Store { hot: false }, Mapped::Store { hot: true }, Mapped::Hot]
    }

    fn all_states() -> Vec<ModelState> {
        let mut states = vec![S::Missing, S::Fetching, S::Stored, S::Hot];
        for m in all_mapped() {
            states.extend([S::Loading(m), S::Loaded(m), S::Unloading(m)]);
        }
        for place in [Place::Nowhere, Place::Store, Place::Hot] {
            states.push(S::Failed { reason: "boom".into(), place });
        }
        states
    }

    fn all_events() -> Vec<Event> {
        use Event::*;
        vec![
            FetchStarted,
            Fetched,
            FetchFailed("404".into()),
            Promoted,
            Demoted,
            LoadStarted,
            LoadFinished,
            LoadFailed("oom".into()),
            Crashed("sigkill".into()),
            UnloadStarted,
            Unloaded,
            Corrupt,
            Retry,
        ]
    }

    fn failed(reason: &str, place: Place) -> ModelState {
        S::Failed { reason: reason.into(), place }
    }

    /// Every allowed transition; everything else must be an error.
    fn allowed() -> Vec<(ModelState, Event, ModelState)> {
        use Event::*;
        let store = |hot| Mapped::Store { hot };
        let corrupt = failed("the store copy failed verification", Place::Nowhere);
        let mut t = vec![
            (S::Missing, FetchStarted, S::Fetching),
            (S::Fetching, Fetched, S::Stored),
            (S::Fetching, FetchFailed("404".into()), failed("404", Place::Nowhere)),
            (S::Fetching, Corrupt, corrupt.clone()),
            (S::Stored, Corrupt, corrupt.clone()),
            (S::Hot, Corrupt, corrupt),
            (S::Stored, Promoted, S::Hot),
            (S::Hot, Demoted, S::Stored),
            (S::Stored, LoadStarted, S::Loading(store(false))),
            (S::Hot, LoadStarted, S::Loading(Mapped::Hot)),
            (failed("boom", Place::Hot), Demoted, failed("boom", Place::Store)),
        ];
        for m in all_mapped() {
            let place = m.place();
            t.extend([
                (S::Loading(m), LoadFinished, S::Loaded(m)),
                (S::Loading(m), LoadFailed("oom".into()), failed("oom", place)),
                (S::Loaded(m), Crashed("sigkill".into()), failed("sigkill", place)),
                (S::Loaded(m), UnloadStarted, S::Unloading(m)),
                (S::Unloading(m), Unloaded, place.idle_state()),
            ]);
        }
        for phase in [S::Loading, S::Loaded, S::Unloading] {
            t.push((phase(store(false)), Promoted, phase(store(true))));
            t.push((phase(store(true)), Demoted, phase(store(false))));
        }
        for place in [Place::Nowhere, Place::Store, Place::Hot] {
            t.push((failed("boom", place), Retry, place.idle_state()));
        }
        t
    }

    #[test]
    fn every_state_event_pair_is_allowed_or_an_error() {
        let allowed = allowed();
        assert_eq!(allowed.len(), 35);
        for state in all_states() {
            for event in all_events() {
                let want = allowed.iter().find(|(s, e, _)| *s == state && *e == event).map(|(_, _, to)| to.clone());
                match (state.apply(event.clone()), want) {
                    (Ok(got), Some(want)) => assert_eq!(got, want, "{state} + {event}"),
                    (Err(err), None) => {
                        assert_eq!((&err.from, &err.event), (&state, &event));
                        assert!(err.to_string().starts_with("model "), "{err}");
                    }
                    (got, want) => panic!("{state} + {event}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn loaded_from_hot_and_from_store_are_both_representable() {
        let from_hot = S::Hot.apply(Event::LoadStarted).unwrap().apply(Event::LoadFinished).unwrap();
        assert_eq!(from_hot, S::Loaded(Mapped::Hot));
        assert!(from_hot.is_hot() && from_hot.is_loaded());
        assert_eq!(from_hot.to_string(), "loaded from the hot tier");
        // A mapped tmpfs copy cannot be dropped.
        let err = from_hot.apply(Event::Demoted).unwrap_err();
        assert_eq!(err.to_string(), "model loaded from the hot tier cannot take event `demoted`");

        let from_store = S::Stored.apply(Event::LoadStarted).unwrap().apply(Event::LoadFinished).unwrap();
        assert!(!from_store.is_hot() && from_store.is_loaded());
        let promoted = from_store.apply(Event::Promoted).unwrap();
        assert_eq!(promoted, S::Loaded(Mapped::Store { hot: true }));
        let after = promoted.apply(Event::UnloadStarted).unwrap().apply(Event::Unloaded).unwrap();
        assert_eq!(after, S::Hot);
    }

    proptest! {
        /// Any sequence of events: errors leave the state alone, and the flags stay consistent.
        #[test]
        fn random_event_sequences_never_panic(
            start in prop::sample::select(all_states()),
            events in prop::collection::vec(prop::sample::select(all_events()), 0..40),
        ) {
            let mut state = start;
            for event in events {
                match state.apply(event.clone()) {
                    Ok(next) => state = next,
                    Err(err) => prop_assert_eq!(&err.from, &state),
                }
                prop_assert!(!state.is_loaded() || state.in_store());
                if let S::Loading(Mapped::Hot) | S::Loaded(Mapped::Hot) | S::Unloading(Mapped::Hot) = state {
                    prop_assert!(state.is_hot());
                }
            }
        }
    }
}

mod demand {
    use super::*;

    #[test]
    fn hours_are_local_and_old_habits_fade() {
        let berlin = tz("Europe/Berlin");
        let mut d = Demand::new(7.0);
        // 07:30Z is 09:30 in Berlin in summer.
        d.record("m", ts("2025-06-02T07:30:00Z"), &berlin);
        assert_eq!(d.score("m", 9), 1.0);
        assert_eq!(d.score("m", 7), 0.0);
        // Two half-lives later the old habit counts a quarter of a new request.
        d.record("m", ts("2025-06-16T12:00:00Z"), &berlin);
        assert!((d.score("m", 9) - 0.25).abs() < 0.01, "{}", d.score("m", 9));
        assert_eq!(d.score("m", 14), 1.0);
        assert!((d.total("m") - 1.25).abs() < 0.01);
    }

    #[test]
    fn survives_a_restart_through_json() {
        let mut d = Demand::default();
        d.record("qwen", ts("2025-06-02T03:00:00Z"), &TimeZone::UTC);
        d.record("smollm2", ts("2025-06-03T21:00:00Z"), &TimeZone::UTC);
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"as_of\":\"2025-06-03T21:00:00Z\""), "{json}");
        let back: Demand = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.score("smollm2", 21), 1.0);
    }
}

mod clock {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(ts("2025-06-02T00:00:00Z"));
        assert_eq!(clock.now(), clock.now());
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), ts("2025-06-02T00:00:01.5Z"));
        clock.set(ts("2025-01-01T00:00:00Z"));
        assert_eq!(clock.now(), ts("2025-01-01T00:00:00Z"));
        let dyn_clock: &dyn Clock = &SystemClock;
        assert!(dyn_clock.now() > ts("2025-01-01T00:00:00Z"));
    }
}
