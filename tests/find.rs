//! C-FIND as real clients see it. The expected answers come from tests/support/find_check.py, an
//! independent implementation of the matching rules over the stored files with pydicom; the
//! node's own code never computes an expectation.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::{self, support_file, Node, Scu, AE};

/// The C-FIND corpus: generated instances in three transfer syntaxes plus pydicom's character
/// set files (ISO 2022 IR 87/13/149, UTF-8, GB18030, Latin-1/2, Greek, Cyrillic, Arabic, Hebrew).
fn corpus(dir: &Path) -> Vec<PathBuf> {
    let mut files = support::make_find_corpus(dir);
    let charsets = support::pydicom_data()
        .expect("pydicom is installed")
        .join("charset_files");
    for name in [
        "chrArab",
        "chrFren",
        "chrGerm",
        "chrGreek",
        "chrH31",
        "chrH32",
        "chrHbrw",
        "chrI2",
        "chrJapMulti",
        "chrKoreanMulti",
        "chrRuss",
        "chrX1",
        "chrX2",
    ] {
        files.push(charsets.join(format!("{name}.dcm")));
    }
    files
}

fn store_all(node: &Node, files: &[PathBuf]) {
    let results = node.send_exact(files);
    assert_eq!(results.len(), files.len());
    for (status, path) in results {
        assert_eq!(status, Some(0), "C-STORE of {}", path.display());
    }
}

/// Runs the oracle against the node; panics with its report unless every query agreed.
fn check(node: &Node, files: &[PathBuf], queries: &Path, extra: &[&str]) {
    let out = support::script("find_check.py")
        .args(["--port", &node.port.to_string(), "--aec", AE])
        .arg("--queries")
        .arg(queries)
        .args(extra)
        .arg("--files")
        .args(files)
        .output()
        .expect("python3");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "C-FIND answers differ from the oracle:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn c_find_answers_agree_with_an_independent_oracle() {
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let files = corpus(dir.path());
    store_all(&node, &files);
    // Every level of both models, every matching kind, 12 character sets, bad levels.
    check(&node, &files, &support_file("find_queries.json"), &[]);
    // Combined date-time matching only when negotiated (the same range matches nothing
    // when date and time are matched separately).
    let combined = support_file("find_queries_combined.json");
    check(&node, &files, &combined, &["--combined-datetime"]);
    let q = dir.path().join("separate.json");
    std::fs::write(
        &q,
        r#"[{"name": "date and time separately", "model": "S", "level": "STUDY",
             "keys": {"StudyDate": "20191231-20200115", "StudyTime": "2300-1300", "StudyInstanceUID": ""}}]"#,
    )
    .unwrap();
    check(&node, &files, &q, &[]);
    assert!(!node.log().contains("DOE"), "patient data in the log");
}

#[test]
fn person_names_can_match_ignoring_case() {
    let node = Node::start_with_env(&[("DICOMCHAIN__NODE__FIND_CASE_INSENSITIVE_NAMES", "true")]);
    let dir = tempfile::tempdir().unwrap();
    let files = corpus(dir.path());
    store_all(&node, &files);
    let q = dir.path().join("ci.json");
    std::fs::write(
        &q,
        r#"[{"name": "exact, any case", "model": "S", "level": "STUDY", "keys": {"PatientName": "doe^john", "StudyInstanceUID": ""}},
            {"name": "wildcard, any case", "model": "P", "level": "PATIENT", "keys": {"PatientName": "DOE*", "PatientID": ""}},
            {"name": "Latin-1, any case", "model": "P", "level": "PATIENT", "charset": "ISO_IR 192", "keys": {"PatientName": "MÜLLER*", "PatientID": ""}}]"#,
    )
    .unwrap();
    check(&node, &files, &q, &["--case-insensitive-pn"]);
}

/// One findscu query: model flag, level and `-k` keys; the oracle's query object for the same.
struct Findscu {
    model: &'static str,
    level: &'static str,
    keys: &'static [(&'static str, &'static str)],
}

fn findscu_queries() -> Vec<Findscu> {
    vec![
        Findscu {
            model: "P",
            level: "PATIENT",
            keys: &[("PatientID", ""), ("PatientName", "")],
        },
        Findscu {
            model: "P",
            level: "PATIENT",
            keys: &[("PatientName", "Sm?th*"), ("PatientID", "")],
        },
        Findscu {
            model: "P",
            level: "STUDY",
            keys: &[("PatientID", "PID001"), ("StudyInstanceUID", "")],
        },
        Findscu {
            model: "P",
            level: "SERIES",
            keys: &[
                ("PatientID", "PID003"),
                ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1474.99.1.4"),
                ("SeriesInstanceUID", ""),
            ],
        },
        Findscu {
            model: "P",
            level: "IMAGE",
            keys: &[
                ("PatientID", "PID004"),
                ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1474.99.1.5"),
                ("SeriesInstanceUID", "1.2.826.0.1.3680043.10.1474.99.2.8"),
                ("SOPInstanceUID", ""),
            ],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[("StudyInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[("StudyDate", "20200101-20200331"), ("StudyInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[("StudyDate", "-20191231"), ("StudyInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[("StudyTime", "0800-1230"), ("StudyInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[("PatientName", "DOE^JOHN"), ("StudyInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[("AccessionNumber", "ACC00?"), ("StudyInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[("ModalitiesInStudy", "MR"), ("StudyInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[
                ("SpecificCharacterSet", "ISO_IR 192"),
                ("PatientName", "=山田*"),
                ("StudyInstanceUID", ""),
            ],
        },
        Findscu {
            model: "S",
            level: "STUDY",
            keys: &[
                ("SpecificCharacterSet", "ISO_IR 192"),
                ("PatientName", "Hong^Gildong=洪^吉洞"),
                ("StudyInstanceUID", ""),
            ],
        },
        Findscu {
            model: "S",
            level: "SERIES",
            keys: &[
                ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1474.99.1.1"),
                ("SeriesInstanceUID", ""),
                ("Modality", "CT"),
            ],
        },
        Findscu {
            model: "S",
            level: "SERIES",
            keys: &[("Modality", "MR"), ("SeriesInstanceUID", "")],
        },
        Findscu {
            model: "S",
            level: "SERIES",
            keys: &[
                ("SeriesInstanceUID", ""),
                ("RequestAttributesSequence[0].RequestedProcedureID", "RP5"),
            ],
        },
        Findscu {
            model: "S",
            level: "IMAGE",
            keys: &[
                ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1474.99.1.1"),
                (
                    "SOPInstanceUID",
                    "1.2.826.0.1.3680043.10.1474.99.3.1.1\\1.2.826.0.1.3680043.10.1474.99.3.2.2",
                ),
            ],
        },
        Findscu {
            model: "S",
            level: "IMAGE",
            keys: &[
                ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1474.99.1.2"),
                ("SOPInstanceUID", ""),
                ("InstanceNumber", ""),
            ],
        },
    ]
}

/// The oracle's query object for a findscu query.
fn oracle_query(name: usize, q: &Findscu) -> serde_json::Value {
    let mut keys = serde_json::Map::new();
    let mut sequences = serde_json::Map::new();
    let mut charset = None;
    for (k, v) in q.keys {
        if *k == "SpecificCharacterSet" {
            charset = Some(*v);
        } else if let Some((seq, sub)) = k.split_once("[0].") {
            sequences.insert(seq.into(), serde_json::json!([{ sub: v }]));
        } else {
            keys.insert((*k).into(), (*v).into());
        }
    }
    let mut o = serde_json::json!({"name": name.to_string(), "model": q.model, "level": q.level, "keys": keys, "sequences": sequences});
    if let Some(c) = charset {
        o["charset"] = c.into();
    }
    o
}

fn unique_tag(level: &str) -> dicom_core::Tag {
    use dicom_dictionary_std::tags;
    match level {
        "PATIENT" => tags::PATIENT_ID,
        "STUDY" => tags::STUDY_INSTANCE_UID,
        "SERIES" => tags::SERIES_INSTANCE_UID,
        _ => tags::SOP_INSTANCE_UID,
    }
}

fn findscu(node: &Node, q: &Findscu, out_dir: &Path) -> Output {
    Scu::findscu()
        .args([&format!("-{}", q.model), "-X"])
        .out_dir(out_dir)
        .level(q.level)
        .keys(q.keys.iter().map(|(k, v)| {
            if v.is_empty() {
                k.to_string()
            } else {
                format!("{k}={v}")
            }
        }))
        .run(node.port)
}

#[test]
fn findscu_patient_and_study_root_at_every_level() {
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let files = corpus(&dir.path().join("corpus"));
    store_all(&node, &files);
    let queries = findscu_queries();
    let oracle: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| oracle_query(i, q))
        .collect();
    let qfile = dir.path().join("queries.json");
    std::fs::write(&qfile, serde_json::to_vec(&oracle).unwrap()).unwrap();
    let out = support::script("find_check.py")
        .args(["--expect-only", "--queries"])
        .arg(&qfile)
        .arg("--files")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (i, q) in queries.iter().enumerate() {
        let rsp_dir = dir.path().join(format!("rsp{i}"));
        std::fs::create_dir_all(&rsp_dir).unwrap();
        let out = findscu(&node, q, &rsp_dir);
        support::assert_ok(&out, "findscu");
        let mut got: Vec<String> = support::files_under(&rsp_dir)
            .iter()
            .map(|p| {
                let obj = dicom_object::open_file(p).expect("findscu response file");
                let level = obj
                    .element(dicom_dictionary_std::tags::QUERY_RETRIEVE_LEVEL)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim()
                    .to_string();
                assert_eq!(level, q.level);
                assert_eq!(
                    obj.element(dicom_dictionary_std::tags::RETRIEVE_AE_TITLE)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .trim(),
                    AE
                );
                obj.element(unique_tag(q.level))
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches(['\0', ' '])
                    .to_string()
            })
            .collect();
        got.sort();
        let want: Vec<String> = expected[i]["expected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(
            !want.is_empty() || q.keys.iter().any(|(k, _)| *k == "StudyDate"),
            "query {i} expects nothing: a weak test"
        );
        assert_eq!(
            got, want,
            "findscu query {i} ({} {}): {:?}",
            q.model, q.level, q.keys
        );
    }
}

#[test]
fn c_find_cancel_limits_and_bad_requests() {
    // 1000 studies: enough that a C-CANCEL lands while matches are still being sent.
    let node = Node::start_with_env(&[("DICOMCHAIN__NODE__MAX_FIND_RESULTS", "950")]);
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_series(
        &dir.path().join("series"),
        "CT",
        1000,
        8,
        &["--studies", "1000"],
    );
    store_all(&node, &files);
    let q = dir.path().join("q.json");
    std::fs::write(
        &q,
        r#"[{"name": "cancel after 3", "model": "S", "level": "STUDY", "keys": {"StudyInstanceUID": ""}, "cancel_after": 3, "cancel_slack": 1000},
            {"name": "more than max_find_results", "model": "S", "level": "STUDY", "keys": {"StudyInstanceUID": ""}, "expect_status": 42752},
            {"name": "within max_find_results", "model": "S", "level": "STUDY", "keys": {"StudyInstanceUID": "", "StudyDate": "20261125", "AccessionNumber": "ACC0000?"}}]"#,
    )
    .unwrap();
    check(&node, &files, &q, &[]);
    // No Query/Retrieve Level: A900 with an Error Comment, and the node goes on serving.
    let out = Scu::findscu()
        .args(["-v", "-S"])
        .key("PatientID")
        .run(node.port);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("DataSetDoesNotMatchSOPClass") || text.contains("A900"),
        "{text}"
    );
    assert!(node
        .log()
        .contains("Query/Retrieve Level (0008,0052) missing"));
    support::assert_ok(&node.echoscu(), "echoscu after bad C-FIND");
}
