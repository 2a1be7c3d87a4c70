//! Corpus test on real files: pydicom's test and charset files, when pydicom is installed.
//!
//! Each Part 10 file (128-byte preamble + "DICM", PS3.10 §7.1) has its file meta group walked
//! here (always Explicit VR Little Endian, PS3.10 §7.1), the data set after it split with random
//! chunk sizes, and reconstruct() checked to be the identity. pydicom itself is the oracle for
//! "this file has a top-level (7FE0,0010)": every such file must yield a splice for it, of the
//! length pydicom read (+8 for the sequence delimiter of encapsulated pixel data, which pydicom
//! doesn't keep in the value).
//!
//! Some files in the corpus are deliberately broken; a SplitError is acceptable for those, and
//! they are listed in the output (`cargo test corpus -- --nocapture`).

use super::testutil::split_chunks;
use super::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Prints, for every file under the two corpus folders, its path relative to pydicom/data and
/// what pydicom found at (7FE0,0010): `pix <undefined 0/1> <value length>`, `nopix` or `err`.
const ORACLE: &str = r#"
import os, pydicom
base = os.path.join(os.path.dirname(pydicom.__file__), "data")
for sub in ("test_files", "charset_files"):
    for root, _, files in os.walk(os.path.join(base, sub)):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, base)
            try:
                ds = pydicom.dcmread(p)
                if 0x7FE00010 not in ds:
                    print(rel, "nopix", sep="\t")
                    continue
                e = ds.get_item(0x7FE00010)
                if hasattr(e, "is_undefined_length"):
                    undef, n = e.is_undefined_length, len(e.value or b"")
                else:
                    undef, n = e.length == 0xFFFFFFFF, len(e.value or b"")
                print(rel, "pix", int(undef), n, sep="\t")
            except Exception as ex:
                print(rel, "err", type(ex).__name__, sep="\t")
"#;

fn pydicom_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import pydicom, os; print(os.path.dirname(pydicom.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(dir.trim()))
}

#[derive(Debug)]
enum Oracle {
    Pixel { undefined: bool, len: u64 },
    NoPixel,
    Unreadable,
}

fn oracle() -> HashMap<String, Oracle> {
    let out = Command::new("python3")
        .args(["-c", ORACLE])
        .output()
        .expect("python3 with pydicom runs");
    assert!(out.status.success(), "oracle script failed: {out:?}");
    let mut map = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let o = match f.as_slice() {
            [_, "pix", u, n] => Oracle::Pixel {
                undefined: *u == "1",
                len: n.parse().expect("length"),
            },
            [_, "nopix"] => Oracle::NoPixel,
            _ => Oracle::Unreadable,
        };
        map.insert(f[0].to_string(), o);
    }
    map
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The file meta group (0002,xxxx), Explicit VR LE (PS3.10 §7.1): returns the transfer syntax
/// UID and where the data set starts.
fn file_meta(file: &[u8]) -> Result<(String, usize), String> {
    let mut pos = 132;
    let mut ts = None;
    while let Some(h) = file.get(pos..pos + 8) {
        let group = u16::from_le_bytes([h[0], h[1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([h[2], h[3]]);
        let vr = [h[4], h[5]];
        let (hlen, len) = match &vr {
            v if super::has_long_length(v) => {
                let l = file.get(pos + 8..pos + 12).ok_or("meta truncated")?;
                (12, u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
            }
            v if v.iter().all(u8::is_ascii_uppercase) => {
                (8, usize::from(u16::from_le_bytes([h[6], h[7]])))
            }
            _ => return Err(format!("file meta not explicit VR at byte {pos}")),
        };
        let value = file
            .get(pos + hlen..pos + hlen + len)
            .ok_or("file meta truncated")?;
        if element == 0x0010 {
            ts = Some(String::from_utf8_lossy(value).into_owned());
        }
        pos += hlen + len;
    }
    Ok((ts.ok_or("no transfer syntax (0002,0010)")?, pos))
}

#[test]
fn pydicom_corpus() {
    let Some(dir) = pydicom_dir() else {
        println!("NOTE: pydicom not installed; corpus test skipped (CI installs it)");
        return;
    };
    let data = dir.join("data");
    let mut files = Vec::new();
    walk(&data.join("test_files"), &mut files);
    walk(&data.join("charset_files"), &mut files);
    files.sort();
    let oracle = oracle();

    let (mut checked, mut ok, mut with_pixels) = (0, 0, 0);
    let mut not_part10 = 0;
    let mut skipped = Vec::new();
    let mut failed = Vec::new();
    let mut mismatches = Vec::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for path in &files {
        let rel = path
            .strip_prefix(&data)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let Ok(file) = std::fs::read(path) else {
            continue;
        };
        if file.len() < 132 || &file[128..132] != b"DICM" {
            not_part10 += 1;
            continue;
        }
        let (ts, start) = match file_meta(&file) {
            Ok(x) => x,
            Err(e) => {
                skipped.push(format!("{rel}: {e}"));
                continue;
            }
        };
        let Some(enc) = Encoding::from_transfer_syntax(&ts) else {
            skipped.push(format!("{rel}: deflated ({})", ts.trim_end_matches('\0')));
            continue;
        };
        checked += 1;
        let body = &file[start..];
        // Random chunk sizes, a mix of tiny and large (xorshift64).
        let sizes: Vec<usize> = (0..16)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if rng.is_multiple_of(3) {
                    1 + (rng >> 8) as usize % 16
                } else {
                    1 + (rng >> 8) as usize % 70_000
                }
            })
            .collect();
        // split_chunks asserts reconstruct() == body on success.
        let split = match split_chunks(enc, body, &sizes) {
            Ok(s) => s,
            Err(e) => {
                failed.push(format!("{rel} [{enc:?}]: {e}"));
                continue;
            }
        };
        ok += 1;
        let whole = split_chunks(enc, body, &[]).expect("whole feed agrees with chunked feed");
        assert_eq!(whole.splices, split.splices, "{rel}");
        if let Some(Oracle::Pixel { undefined, len }) = oracle.get(&rel) {
            with_pixels += 1;
            let pixel_tag = if enc.is_big_endian() {
                [0x7F, 0xE0, 0x00, 0x10]
            } else {
                [0xE0, 0x7F, 0x10, 0x00]
            };
            let expected = if *undefined { len + 8 } else { *len };
            let found = split.splices.iter().find(|s| {
                split
                    .meta
                    .get(s.header_offset as usize..s.header_offset as usize + 4)
                    == Some(&pixel_tag[..])
            });
            match found {
                None => mismatches.push(format!("{rel}: no splice for (7FE0,0010)")),
                Some(s) if s.length != expected => mismatches.push(format!(
                    "{rel}: splice length {} but pydicom read {expected}",
                    s.length
                )),
                Some(_) => {}
            }
        }
    }

    println!(
        "corpus: {} files, {not_part10} not Part 10, {checked} checked, {ok} split OK \
         ({with_pixels} with top-level Pixel Data), {} split errors, {} skipped",
        files.len(),
        failed.len(),
        skipped.len()
    );
    for s in &skipped {
        println!("  skipped: {s}");
    }
    for f in &failed {
        println!("  split error: {f}");
    }
    assert!(
        checked > 0,
        "pydicom is installed but no corpus file was checked"
    );
    assert!(
        mismatches.is_empty(),
        "pixel data mismatches: {mismatches:#?}"
    );
    assert!(ok >= 40, "only {ok} corpus files split successfully");
}
