//! Property tests: no input panics the parser or the validator, positions stay inside the
//! file, and the unit formats read back what they print.

mod common;

use std::path::Path;

use kiln_spec::units::{format_bytes, format_duration, parse_bytes, parse_duration_secs, parse_window};
use kiln_spec::validate::{Context, load_str};
use proptest::prelude::*;

fn check_positions(text: &str) {
    // Lines as YAML counts them: a lone \r breaks a line too (YAML 1.2, 5.4), where str::lines
    // splits at \n only.
    let lines = text.replace("\r\n", "\n").replace('\r', "\n").lines().count() as u64 + 1;
    if let Err(d) = load_str(text, Path::new("p.yaml"), Path::new("."), Context::Host) {
        assert!(!d.items.is_empty(), "an error without a diagnostic");
        for item in &d.items {
            assert!(
                item.pos.line >= 1 && item.pos.line <= lines.max(1),
                "line {} outside 1..={lines}: {item:?}",
                item.pos.line
            );
        }
    }
}

/// Found by `yaml_shaped_text_never_panics`: the error is on line 5 of a text that has four
/// lines by `str::lines`, because the parser (rightly) breaks the line at the lone \r.
#[test]
fn a_lone_carriage_return_is_a_line_break() {
    check_positions("-:\n -:\"\r\"\n -:\n");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        check_positions(&text);
    }

    #[test]
    fn yaml_shaped_text_never_panics(text in "([a-z-]{1,12}: ?(\\[|\\{|[0-9a-zA-Z%./:-]{0,10}|\"[^\"]{0,8}\"|&a|\\*a)?\n {0,4}){0,25}") {
        check_positions(&text);
    }

    #[test]
    fn mutated_examples_never_panic(example in 0usize..3, cut in 0usize..2000, len in 0usize..40, insert in "\\PC{0,6}") {
        let name = common::EXAMPLES[example];
        let text = std::fs::read_to_string(common::repo_root().join(format!("examples/{name}.yaml"))).expect("example");
        let mut chars: Vec<char> = text.chars().collect();
        let at = cut.min(chars.len());
        let end = (at + len).min(chars.len());
        chars.splice(at..end, insert.chars());
        let mutated: String = chars.into_iter().collect();
        check_positions(&mutated);
    }

    #[test]
    fn byte_sizes_read_back(n in 0u64..(1u64 << 50)) {
        prop_assert_eq!(parse_bytes(&format_bytes(n)), Ok(n));
    }

    #[test]
    fn durations_read_back(n in 0u64..(400u64 * 86_400)) {
        prop_assert_eq!(parse_duration_secs(&format_duration(n)), Ok(n));
    }

    #[test]
    fn windows_read_back(days in 1u8..128, start in 0u32..1440, len in 1u32..1440) {
        let end = (start + len) % 1440;
        let w = kiln_spec::units::Window { days_mask: days, start_min: start, end_min: end };
        prop_assert_eq!(parse_window(&w.to_string()), Ok(w));
    }
}

#[test]
fn units_accept_what_users_write_and_explain_what_they_do_not() {
    assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
    assert_eq!(parse_bytes("4608MiB"), Ok(4608 << 20));
    assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
    assert_eq!(parse_bytes("98362432"), Ok(98_362_432));
    assert!(parse_bytes("8GB").unwrap_err().contains("write 8GiB"));
    assert!(parse_bytes("-1GiB").is_err());
    assert!(parse_bytes("GiB").is_err());
    assert_eq!(parse_duration_secs("1h30m"), Ok(5400));
    assert_eq!(parse_duration_secs("7d"), Ok(604_800));
    assert!(parse_duration_secs("30 minutes").is_err());
    assert!(parse_duration_secs("500ms").unwrap_err().contains("whole seconds"));
    let w = parse_window("23:00-02:00").expect("crosses midnight");
    assert!(w.crosses_midnight());
    assert_eq!(w.length_min(), 180);
    assert_eq!(parse_window("fri-mon 22:00-24:00").expect("wraps the week").days_mask, 0b111_0001);
    assert!(parse_window("frii 01:00-02:00").unwrap_err().contains("did you mean `fri`"));
    assert_eq!(kiln_spec::units::parse_cpuset("0,2-3"), Ok(vec![0, 2, 3]));
    assert!(kiln_spec::units::parse_cpuset("3-1").is_err());
}
