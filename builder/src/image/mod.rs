//! Disk images as regular files: partition tables, FAT and ext4 filesystems, sparse copies
//! and block maps. Nothing here mounts anything or needs a loop device.

pub mod apply;
pub mod bmap;
pub mod boot;
pub mod ext4;
pub mod fat;
pub mod partition;
pub mod sparse;
pub mod users;
