//! Loading, defaults, environment overrides and the errors that name their key.

use super::*;
use std::collections::HashMap;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let vars: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let env = config::Environment::with_prefix("DICOMCHAIN")
        .separator("__")
        .prefix_separator("__")
        .source(Some(vars));
    Config::load_with_env(&path, env)
}

#[test]
fn defaults_apply_to_an_empty_file() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.node.ae_title, "DICOMCHAIN");
    assert_eq!(c.node.listen, "0.0.0.0:11112");
    assert_eq!(c.node.max_pdu_length, 65536);
    assert_eq!(c.store.backend, StoreBackend::Fs);
    assert_eq!(c.ledger.path, PathBuf::from("var/ledger"));
}

#[test]
fn environment_overrides_file() {
    let c = load(
        "[node]\nlisten = \"0.0.0.0:1\"\n",
        &[("DICOMCHAIN__NODE__LISTEN", "127.0.0.1:4242")],
    )
    .unwrap();
    assert_eq!(c.node.listen, "127.0.0.1:4242");
    let c = load("", &[("DICOMCHAIN__NODE__MAX_ASSOCIATIONS", "3")]).unwrap();
    assert_eq!(c.node.max_associations, 3);
}

#[test]
fn unknown_key_is_named() {
    let e = load("[node]\nae_tittle = \"X\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("ae_tittle"), "{e}");
    let e = load("[nodes]\n", &[]).unwrap_err().to_string();
    assert!(e.contains("nodes"), "{e}");
}

#[test]
fn invalid_values_are_named() {
    let e = load("[node]\nmax_pdu_length = 10\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.max_pdu_length"), "{e}");
    let e = load("[node]\nlisten = \"nowhere\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.listen"), "{e}");
    let e = load("[store]\nbackend = \"ftp\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("ftp"), "{e}");
    let e = load("[node]\nae_title = \"WAY_TOO_LONG_AE_TITLE\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.ae_title"), "{e}");
}

#[test]
fn secrets_are_masked_and_read_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("secret");
    std::fs::write(&f, "s3cr3t\n").unwrap();
    let text = format!(
        "[store]\nbackend = \"s3\"\n[store.s3]\naccess_key = \"AKIA\"\nsecret_key_file = {:?}\n",
        f.display().to_string()
    );
    let c = load(&text, &[]).unwrap();
    assert_eq!(c.store.s3.resolved_secret_key().unwrap(), "s3cr3t");
    let shown = c.render_masked();
    assert!(
        !shown.contains("AKIA") && !shown.contains("s3cr3t"),
        "{shown}"
    );
    let e = load(
        "[store]\nbackend = \"s3\"\n[store.s3]\nsecret_key_file = \"/nonexistent/x\"\n",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x"));
}

#[test]
fn the_shipped_config_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/dicomchain.toml");
    let env = config::Environment::with_prefix("DICOMCHAIN").source(Some(HashMap::new()));
    Config::load_with_env(&path, env).unwrap();
}
