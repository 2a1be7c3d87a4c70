//! The crate's layering (docs/ARCHITECTURE.md), checked by `.ci/layering.py` from the `use` lines
//! and paths of src/: no import cycle between files, and each layer imports only what lies below.

#[test]
fn imports_follow_the_layers_and_form_no_cycle() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/layering.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .output()
        .expect("python3 runs .ci/layering.py");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
