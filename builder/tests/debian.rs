//! A `base.debian` build of the generic-x86_64 example (the VM demo): mmdebstrap, then the
//! same rootless assembly; the image has an EFI system partition with systemd-boot, a kernel
//! and initrd, and a root with systemd, kilnd, the model and everything the spec renders.

mod common;

use common::*;
use kiln_builder::build::build;

#[test]
fn debian_base_build_of_the_vm_demo() {
    let test = "debian_base_build_of_the_vm_demo";
    let rootless_ok =
        nix::unistd::geteuid().is_root() || std::fs::read_to_string("/etc/subuid").is_ok_and(|s| !s.trim().is_empty());
    if !available(test, "mmdebstrap (as root, or with /etc/subuid for unshare mode)", have("mmdebstrap") && rootless_ok)
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = repo().join("examples/generic-x86_64.yaml");
    let r = build(&options(&spec, &tmp.path().join("out"), &kilnd_host()), &Quiet).unwrap();
    let img = &r.image;
    let table = kiln_builder::image::partition::read(img).unwrap();
    assert_eq!(table.kind, kiln_builder::image::partition::Kind::Gpt);
    assert_eq!(table.parts[0].type_id, kiln_builder::image::partition::GPT_ESP);
    assert_eq!(table.parts[1].type_id, kiln_builder::image::partition::GPT_ROOT_X86_64);
    let root_uuid = table.parts[1].uuid.clone().unwrap().to_lowercase();
    assert_eq!(root_uuid, kiln_builder::plan::derived_uuid("kiln-demo", "root").to_lowercase());

    let entry = fat_file(img, 1, "loader/entries/kiln.conf");
    assert!(
        entry.contains(&format!("root=PARTUUID={root_uuid}"))
            && entry.contains("console=ttyS0")
            && entry.contains("zswap.enabled=0"),
        "{entry}"
    );
    assert!(fat_file(img, 1, "loader/loader.conf").contains("default kiln.conf"));
    for f in ["EFI/BOOT/BOOTX64.EFI", "vmlinuz", "initrd.img"] {
        assert!(!fat_file(img, 1, f).is_empty(), "{f} missing from the ESP");
    }

    for path in [
        "/lib/systemd/systemd",
        "/usr/lib/systemd/system-generators/zram-generator",
        "/usr/sbin/sshd",
        "/usr/bin/sudo",
        "/usr/bin/kilnd",
    ] {
        assert!(debugfs(img, 2, &format!("stat {path}")).contains("Inode:"), "{path} missing from the root");
    }
    assert!(debugfs(img, 2, "cat /etc/fstab").contains(&format!("PARTUUID={root_uuid}\t/\text4")));
    assert!(
        debugfs(img, 2, "cat /etc/passwd").contains("kiln-admin:x:1000:1000:kiln-admin:/home/kiln-admin:/bin/bash")
    );
    assert!(debugfs(img, 2, "cat /etc/kiln/spec.yaml").contains("name: kiln-demo"));
    assert!(
        debugfs(img, 2, "ls -l /var/lib/kiln/models")
            .contains("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.gguf")
    );
    assert_eq!(debugfs(img, 2, "cat /etc/machine-id"), "uninitialized\n");

    // The cached base makes a second build quick and identical.
    let again = build(&options(&spec, &tmp.path().join("again"), &kilnd_host()), &Quiet).unwrap();
    assert!(again.base_from_cache);
    assert_eq!(again.sha256, r.sha256);
}
