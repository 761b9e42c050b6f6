//! The image's layout from the spec and its base: partition table, identifiers derived from
//! the spec (so rebuilds are bit-identical and two devices never share a PARTUUID), and sizes.
//! Pure functions.

use sha2::{Digest, Sha256};

use crate::base::SavedTable;
use crate::image::partition::{self, Kind, Part, Table};

pub const MIB: u64 = 1024 * 1024;
const ALIGN: u64 = 8 * MIB;

fn align_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn digest(name: &str, what: &str) -> [u8; 32] {
    Sha256::digest(format!("kiln:{what}:{name}").as_bytes()).into()
}

/// A UUID (v4 layout) derived from the spec's name and a purpose.
pub fn derived_uuid(name: &str, what: &str) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest(name, what)[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &x[0..8], &x[8..12], &x[12..16], &x[16..20], &x[20..32]).to_uppercase()
}

/// The MBR disk identifier (the PARTUUID prefix) for a spec: never zero.
pub fn mbr_disk_id(name: &str) -> String {
    let d = digest(name, "mbr-disk-id");
    let id = u32::from_le_bytes([d[0], d[1], d[2], d[3]]).max(1);
    format!("0x{id:08x}")
}

/// Root filesystem size: what the base holds plus the payload kiln adds (models, kilnd) and
/// room to grow (a quarter of the payload, at least 256 MiB), in 8 MiB steps.
pub fn root_fs_size(base_fs_bytes: u64, payload_bytes: u64) -> u64 {
    align_up(base_fs_bytes + payload_bytes + (payload_bytes / 4).max(256 * MIB), ALIGN)
}

/// The layout for a Raspberry Pi base image: its boot partition where it was, a new disk id,
/// the root partition grown to `root_bytes`.
pub fn rpi_table(name: &str, base: &SavedTable, boot: usize, root: usize, root_bytes: u64) -> Table {
    let (boot_start, boot_size, boot_type) = base.parts[boot].clone();
    let root_start = base.parts[root].0;
    Table {
        kind: Kind::Mbr,
        id: mbr_disk_id(name),
        parts: vec![
            Part { start_bytes: boot_start, size_bytes: boot_size, type_id: boot_type, uuid: None, name: None },
            Part { start_bytes: root_start, size_bytes: root_bytes, type_id: "83".into(), uuid: None, name: None },
        ],
    }
}

/// Size of the EFI system partition: kernel, initrd and systemd-boot.
pub const ESP_BYTES: u64 = 256 * MIB;

/// The layout for the generic boards: GPT, an EFI system partition, the root.
pub fn efi_table(name: &str, aarch64: bool, root_bytes: u64) -> Table {
    let esp_start = MIB;
    let root_start = esp_start + ESP_BYTES;
    Table {
        kind: Kind::Gpt,
        id: derived_uuid(name, "gpt-disk"),
        parts: vec![
            Part {
                start_bytes: esp_start,
                size_bytes: ESP_BYTES,
                type_id: partition::GPT_ESP.into(),
                uuid: Some(derived_uuid(name, "esp")),
                name: Some("esp".into()),
            },
            Part {
                start_bytes: root_start,
                size_bytes: root_bytes,
                type_id: if aarch64 { partition::GPT_ROOT_AARCH64 } else { partition::GPT_ROOT_X86_64 }.into(),
                uuid: Some(derived_uuid(name, "root")),
                name: Some("root".into()),
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_stable_per_name_and_differ_between_names() {
        assert_eq!(mbr_disk_id("kitchen"), mbr_disk_id("kitchen"));
        assert_ne!(mbr_disk_id("kitchen"), mbr_disk_id("hallway"));
        let u = derived_uuid("kitchen", "root");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(derived_uuid("kitchen", "root"), derived_uuid("kitchen", "esp"));
    }

    #[test]
    fn tables_keep_the_base_boot_partition_and_grow_the_root() {
        let base = SavedTable {
            gpt: false,
            id: "0x4b1c3a5e".into(),
            parts: vec![(8 * MIB, 512 * MIB, "c".into()), (520 * MIB, 900 * MIB, "83".into())],
        };
        let t = rpi_table("kitchen", &base, 0, 1, 2048 * MIB);
        assert_eq!(t.parts[0].start_bytes, 8 * MIB);
        assert_eq!(t.parts[1].start_bytes, 520 * MIB);
        assert_eq!(t.image_size_bytes(), 520 * MIB + 2048 * MIB);
        assert_eq!(t.partuuid(2), Some(format!("{}-02", &mbr_disk_id("kitchen")[2..])));
        let g = efi_table("demo", false, 1024 * MIB);
        assert_eq!(g.image_size_bytes(), MIB + ESP_BYTES + 1024 * MIB + MIB);
        assert_eq!(root_fs_size(1000 * MIB, 100 * MIB) % ALIGN, 0);
        assert!(root_fs_size(1000 * MIB, 100 * MIB) >= 1356 * MIB);
    }
}
