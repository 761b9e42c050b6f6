//! Reading block maps: every way a bmap file can be wrong names the file and the fault.

use std::path::Path;

use kiln_builder::image::bmap::{self, Bmap, BmapError, BmapRange};

fn range(first_block: u64, last_block: u64) -> BmapRange {
    BmapRange { first_block, last_block, sha256: "ab".repeat(32) }
}

fn parse(bmap: &Bmap) -> Result<Bmap, BmapError> {
    bmap::parse(bmap::to_xml(bmap).as_bytes(), Path::new("x.bmap"))
}

#[test]
fn a_well_formed_map_round_trips_through_xml() {
    let map =
        Bmap { image_size: 10 * 4096 + 5, block_size: 4096, ranges: vec![range(0, 0), range(3, 7), range(10, 10)] };
    assert_eq!(parse(&map).unwrap(), map);
    assert_eq!(map.mapped_bytes(), 6 * 4096 + 5);
}

#[test]
fn ranges_past_the_image_or_out_of_order_are_rejected_with_their_line() {
    let past = Bmap { image_size: 8192, block_size: 4096, ranges: vec![range(1, 2)] };
    assert_eq!(parse(&past).unwrap_err().to_string(), "x.bmap: line 48: range \"1-2\" goes past the image's 2 blocks");
    let overlap = Bmap { image_size: 40960, block_size: 4096, ranges: vec![range(0, 5), range(5, 6)] };
    assert_eq!(
        parse(&overlap).unwrap_err().to_string(),
        "x.bmap: line 49: range 5-6 overlaps or precedes range 0-5; ranges must ascend"
    );
}

#[test]
fn broken_files_name_the_file_and_the_fault() {
    let err = bmap::parse(b"<bmap version=\"2.0\"", Path::new("x.bmap")).unwrap_err();
    assert!(matches!(err, BmapError::Xml { .. }) && err.to_string() == "x.bmap: not a well-formed bmap XML file");
    let err = bmap::parse(b"<bmap version=\"3.0\"/>", Path::new("x.bmap")).unwrap_err();
    assert_eq!(err.to_string(), "x.bmap: bmap version \"3.0\" is not supported (kiln reads 2.x and 1.4)");
    let err = bmap::parse(b"<bmap version=\"2.0\"><ChecksumType>sha256</ChecksumType></bmap>", Path::new("x.bmap"))
        .unwrap_err();
    assert_eq!(err.to_string(), "x.bmap: <BmapFileChecksum> is missing");
    let err = bmap::read(Path::new("/nonexistent/x.bmap")).unwrap_err();
    assert_eq!(err.to_string(), "reading /nonexistent/x.bmap");
}

#[test]
fn an_empty_image_has_no_map() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = bmap::generate(file.path()).unwrap_err();
    assert_eq!(err.to_string(), format!("{}: the image is empty, there is nothing to map", file.path().display()));
}
