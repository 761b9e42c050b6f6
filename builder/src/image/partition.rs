//! Partition tables of image files, read and written with util-linux's sfdisk (which works on
//! regular files without root): MBR for Raspberry Pi images, GPT for the generic VM boards.

use std::path::Path;

use serde::Deserialize;

use crate::tools::{self, ToolError};

pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// MBR type byte in hex (`c`, `83`) or a GPT type GUID.
    pub type_id: String,
    /// GPT partition GUID (MBR PARTUUIDs derive from the disk id).
    pub uuid: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub kind: Kind,
    /// MBR disk identifier (`0x4b1c3a5e`) or GPT disk GUID.
    pub id: String,
    pub parts: Vec<Part>,
}

/// GPT partition types (UAPI discoverable partitions specification).
pub const GPT_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const GPT_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
pub const GPT_ROOT_AARCH64: &str = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE";

impl Table {
    /// PARTUUID of partition `n` (1-based) as the kernel and fstab name it.
    pub fn partuuid(&self, n: usize) -> Option<String> {
        match self.kind {
            Kind::Mbr => {
                let id = self.id.trim_start_matches("0x").to_lowercase();
                (n >= 1 && n <= self.parts.len()).then(|| format!("{id:0>8}-{n:02}"))
            }
            Kind::Gpt => self.parts.get(n.checked_sub(1)?).and_then(|p| p.uuid.as_ref()).map(|u| u.to_lowercase()),
        }
    }

    /// Bytes the image needs: the end of the last partition, plus the backup GPT.
    pub fn image_size_bytes(&self) -> u64 {
        let end = self.parts.iter().map(|p| p.start_bytes + p.size_bytes).max().unwrap_or(0);
        match self.kind {
            Kind::Mbr => end,
            Kind::Gpt => end + 1024 * 1024,
        }
    }

    fn script(&self) -> String {
        let mut s = String::new();
        match self.kind {
            Kind::Mbr => s.push_str(&format!("label: dos\nlabel-id: {}\nunit: sectors\n\n", self.id)),
            Kind::Gpt => s.push_str(&format!("label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n\n", self.id)),
        }
        for p in &self.parts {
            s.push_str(&format!(
                "start={}, size={}, type={}",
                p.start_bytes / SECTOR,
                p.size_bytes / SECTOR,
                p.type_id
            ));
            if let Some(u) = &p.uuid {
                s.push_str(&format!(", uuid={u}"));
            }
            if let Some(n) = &p.name {
                s.push_str(&format!(", name=\"{n}\""));
            }
            s.push('\n');
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("reading the partition table of {path}: {message}")]
    Parse { path: String, message: String },
}

#[derive(Deserialize)]
struct Json {
    partitiontable: JsonTable,
}

#[derive(Deserialize)]
struct JsonTable {
    label: String,
    id: String,
    #[serde(default)]
    sectorsize: Option<u64>,
    #[serde(default)]
    partitions: Vec<JsonPart>,
}

#[derive(Deserialize)]
struct JsonPart {
    start: u64,
    size: u64,
    #[serde(rename = "type")]
    type_id: String,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// Reads an image's partition table.
pub fn read(image: &Path) -> Result<Table, PartitionError> {
    let out = tools::run("sfdisk", [std::ffi::OsStr::new("--json"), image.as_os_str()], None)?;
    let parse_err = |message: String| PartitionError::Parse { path: image.display().to_string(), message };
    let json: Json = serde_json::from_slice(&out).map_err(|e| parse_err(e.to_string()))?;
    let t = json.partitiontable;
    let sector = t.sectorsize.unwrap_or(SECTOR);
    let kind = match t.label.as_str() {
        "dos" => Kind::Mbr,
        "gpt" => Kind::Gpt,
        other => return Err(parse_err(format!("unsupported partition table `{other}` (expected MBR or GPT)"))),
    };
    let parts = t
        .partitions
        .into_iter()
        .map(|p| Part {
            start_bytes: p.start * sector,
            size_bytes: p.size * sector,
            type_id: p.type_id,
            uuid: p.uuid,
            name: p.name,
        })
        .collect();
    Ok(Table { kind, id: t.id, parts })
}

/// Writes a partition table onto an image file that is already large enough.
pub fn write(image: &Path, table: &Table) -> Result<(), PartitionError> {
    let args = [
        std::ffi::OsStr::new("--quiet"),
        std::ffi::OsStr::new("--no-reread"),
        std::ffi::OsStr::new("--no-tell-kernel"),
        image.as_os_str(),
    ];
    tools::run("sfdisk", args, Some(table.script().as_bytes()))?;
    Ok(())
}
