//! kiln's edits of files the base owns on the boot partition: its block in config.txt and its
//! arguments in cmdline.txt. Pure text functions, shared by the builder (editing an image) and
//! kilnd (activating a generation on the device).

const BEGIN: &str = "# BEGIN kiln";
const END: &str = "# END kiln";

/// config.txt with kiln's block replacing an earlier one, or appended after the last line.
/// The block starts with `[all]` so earlier conditional sections do not capture it.
pub fn merge_config_txt(base: &str, block: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in base.lines() {
        if line.starts_with(BEGIN) {
            inside = true;
            continue;
        }
        if inside {
            if line.starts_with(END) {
                inside = false;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(block);
    if !block.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn key(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(k, _)| k)
}

/// cmdline.txt (one line) with kiln's arguments replacing any with the same key and the root
/// device pointed at `root_partuuid`.
pub fn merge_cmdline(base: &str, args: &[&str], root_partuuid: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for arg in base.split_whitespace() {
        if key(arg) == "root" {
            out.push(format!("root=PARTUUID={root_partuuid}"));
        } else if !args.iter().any(|a| key(a) == key(arg)) {
            out.push(arg.to_string());
        }
    }
    if !out.iter().any(|a| key(a) == "root") {
        out.insert(0, format!("root=PARTUUID={root_partuuid}"));
    }
    out.extend(args.iter().map(|a| a.to_string()));
    format!("{}\n", out.join(" "))
}

/// The `root=` argument of a cmdline.txt, e.g. `PARTUUID=4b1c3a5e-02`.
pub fn cmdline_root(cmdline: &str) -> Option<&str> {
    cmdline.split_whitespace().find_map(|a| a.strip_prefix("root="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_block_is_appended_once_and_replaced_on_rebuild() {
        let base = "dtparam=audio=on\n[cm5]\ndtoverlay=dwc2\n\n[all]\n";
        let block = "# BEGIN kiln: x\n[all]\narm_freq=2800\n# END kiln\n";
        let once = merge_config_txt(base, block);
        assert_eq!(
            once,
            "dtparam=audio=on\n[cm5]\ndtoverlay=dwc2\n\n[all]\n\n# BEGIN kiln: x\n[all]\narm_freq=2800\n# END kiln\n"
        );
        let block2 = "# BEGIN kiln: x\n[all]\narm_freq=2600\n# END kiln\n";
        let twice = merge_config_txt(&once, block2);
        assert_eq!(merge_config_txt(&once, block), once, "merging the same block again changes nothing");
        assert_eq!(
            twice,
            "dtparam=audio=on\n[cm5]\ndtoverlay=dwc2\n\n[all]\n\n# BEGIN kiln: x\n[all]\narm_freq=2600\n# END kiln\n"
        );
    }

    #[test]
    fn cmdline_keeps_base_arguments_and_replaces_root_and_kiln_keys() {
        let base = "console=serial0,115200 console=tty1 root=PARTUUID=4b1c3a5e-02 rootfstype=ext4 zswap.enabled=1 rootwait resize\n";
        let merged = merge_cmdline(base, &["cgroup_enable=memory", "zswap.enabled=0"], "deadbeef-02");
        assert_eq!(
            merged,
            "console=serial0,115200 console=tty1 root=PARTUUID=deadbeef-02 rootfstype=ext4 rootwait resize cgroup_enable=memory zswap.enabled=0\n"
        );
        assert_eq!(merge_cmdline(&merged, &["cgroup_enable=memory", "zswap.enabled=0"], "deadbeef-02"), merged);
    }

    #[test]
    fn the_root_argument_is_found() {
        assert_eq!(cmdline_root("console=tty1 root=PARTUUID=ab-02 rootwait"), Some("PARTUUID=ab-02"));
        assert_eq!(cmdline_root("console=tty1"), None);
    }
}
