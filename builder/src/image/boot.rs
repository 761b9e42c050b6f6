//! Edits of the base's boot files: kiln's block in config.txt, kiln's arguments and the new
//! root PARTUUID in cmdline.txt, and the PARTUUIDs in /etc/fstab. Pure text functions.

pub use kiln_spec::bootfiles::{merge_cmdline, merge_config_txt};

/// fstab with every `PARTUUID=<old disk id>-NN` pointed at the new disk id.
pub fn retarget_fstab(fstab: &str, old_disk: &str, new_disk: &str) -> String {
    fstab.replace(&format!("PARTUUID={old_disk}-"), &format!("PARTUUID={new_disk}-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_points_at_the_new_disk() {
        let f = "PARTUUID=4b1c3a5e-01  /boot/firmware vfat defaults 0 2\nPARTUUID=4b1c3a5e-02 / ext4 defaults 0 1\n";
        assert_eq!(
            retarget_fstab(f, "4b1c3a5e", "0badcafe"),
            "PARTUUID=0badcafe-01  /boot/firmware vfat defaults 0 2\nPARTUUID=0badcafe-02 / ext4 defaults 0 1\n"
        );
    }
}
