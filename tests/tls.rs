//! DICOM over TLS with DCMTK: storescu and findscu with client certificates (mutual TLS), a
//! client whose certificate another CA signed and one without a certificate refused, the plain
//! port unaffected; AE titles bound to TLS and to certificate names, and a node with no plain
//! listener at all.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{self, assert_ok, Node, Scu};

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signs (openssl CLI).
pub(crate) struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert_ok(&out, &format!("openssl {}", args.join(" ")));
}

impl Pki {
    pub(crate) fn new(dir: &Path) -> Pki {
        let ca = |name: &str| {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.crt"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            )
        };
        ca("ca");
        ca("other-ca");
        let leaf = |name: &str, issuer: &str, ext: &str| {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{issuer}.crt"),
                    "-CAkey",
                    &format!("{issuer}.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{name}.crt"),
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        };
        let server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n";
        let client = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
        leaf("server", "ca", server);
        leaf("client", "ca", client);
        leaf("intruder", "other-ca", client);
        // For the AE-title bindings: a certificate named ADMIN, and one for a modality whose
        // DNS name (a SAN) is what its AE title is bound to.
        leaf("ADMIN", "ca", client);
        leaf(
            "storeonly",
            "ca",
            &format!("{client}subjectAltName=DNS:storeonly.example\n"),
        );
        // The bound name as CN, but a SAN for another host: SANs win (RFC 6125 §6.4.4).
        leaf(
            "storeonly.example",
            "ca",
            &format!("{client}subjectAltName=DNS:elsewhere.example\n"),
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub(crate) fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A DCMTK tool over TLS as `who` (a key/certificate pair name, or None for anonymous TLS),
/// trusting the test CA.
fn dcmtk_tls(tool: &'static str, pki: &Pki, who: Option<&str>) -> Scu {
    let ca = pki.path("ca.crt");
    match who {
        Some(w) => Scu::new(tool).tls(
            &pki.path(&format!("{w}.key")),
            &pki.path(&format!("{w}.crt")),
            &ca,
        ),
        None => Scu::new(tool).anonymous_tls(&ca),
    }
}

/// Starts a node whose DICOM TLS listener (on port 0) presents the test CA's server certificate
/// and asks clients for one the CA signed; `env` and `toml` as for [`Node::start_with`].
fn start_mutual_tls(pki: &Pki, env: &[(&str, &str)], toml: &str) -> Node {
    let (cert, key, ca) = (
        pki.path("server.crt"),
        pki.path("server.key"),
        pki.path("ca.crt"),
    );
    let mut env = env.to_vec();
    env.extend([
        ("DICOMCHAIN__NODE__TLS__LISTEN", "127.0.0.1:0"),
        ("DICOMCHAIN__NODE__TLS__CERT", cert.as_str()),
        ("DICOMCHAIN__NODE__TLS__KEY", key.as_str()),
        ("DICOMCHAIN__NODE__TLS__CLIENT_CA", ca.as_str()),
    ]);
    Node::start_with(&env, toml)
}

/// The log without its ANSI colours.
fn plain(log: &str) -> String {
    let mut out = String::new();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn dcmtk_stores_and_finds_over_mutual_tls_and_strangers_are_refused() {
    let keys = tempfile::tempdir().unwrap();
    let pki = Pki::new(keys.path());
    let node = start_mutual_tls(&pki, &[], "");
    let tls_port = node.tls_port();
    let (_src, files) = support::ct_series(3, 64);

    // storescu over TLS with the client certificate: stored, and exported byte for byte.
    let out = dcmtk_tls("storescu", &pki, Some("client"))
        .files(&files)
        .run(tls_port);
    assert_ok(&out, "storescu +tls");
    let log = plain(&node.log());
    assert!(log.contains("tls=true calling=\"STORESCU\""), "{log}");
    for f in &files {
        let p = support::read_part10(f).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_ok(
            &node.export(&["--instance", &p.sop_instance_uid], dir.path()),
            "export",
        );
        let got = support::read_part10(&support::files_under(dir.path())[0]).unwrap();
        assert_eq!(got.dataset, p.dataset, "{}", f.display());
    }

    // findscu over TLS finds the study.
    let qdir = tempfile::tempdir().unwrap();
    let find = dcmtk_tls("findscu", &pki, Some("client"))
        .args(["-S", "-X"])
        .out_dir(qdir.path())
        .level("STUDY")
        .key("StudyInstanceUID")
        .run(tls_port);
    assert_ok(&find, "findscu +tls");
    assert_eq!(
        support::files_under(qdir.path()).len(),
        1,
        "one study found over TLS"
    );

    // A certificate from another CA, and no certificate at all: no association.
    let echo = |who: Option<&str>| dcmtk_tls("echoscu", &pki, who).run(tls_port);
    assert!(
        !echo(Some("intruder")).status.success(),
        "a stranger's certificate was accepted"
    );
    assert!(
        !echo(None).status.success(),
        "a client without a certificate was accepted"
    );
    assert_ok(
        &echo(Some("client")),
        "echoscu +tls with the right certificate",
    );
    assert!(
        node.log().contains("TLS handshake failed"),
        "{}",
        node.log()
    );
    // Plain DICOM goes on as before on its own port.
    assert_ok(&node.echoscu(), "plain echoscu");
}

#[test]
fn a_missing_certificate_file_stops_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.crt").display().to_string();
    let config = dir.path().join("dicomchain.toml");
    std::fs::write(&config, "").unwrap();
    let out = support::dicomchain()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env("DICOMCHAIN__NODE__LISTEN", "127.0.0.1:0")
        .env("DICOMCHAIN__NODE__TLS__LISTEN", "127.0.0.1:0")
        .env("DICOMCHAIN__NODE__TLS__CERT", &missing)
        .env("DICOMCHAIN__NODE__TLS__KEY", &missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.tls.cert") && err.contains("nope.crt"),
        "{err}"
    );
}

/// Issue 23, item 4: with mutual TLS on the TLS port, an AE title could still associate in
/// plain text, and a certificate issued to CN=ADMIN was accepted for AE title STOREONLY.
#[test]
fn tls_bound_ae_titles_refuse_plain_text_and_other_certificates() {
    let keys = tempfile::tempdir().unwrap();
    let pki = Pki::new(keys.path());
    let peers = [
        support::peer("admin", "ADMIN", 1),
        "tls_required = true\n".into(),
        support::peer("storeonly", "STOREONLY", 1),
        "permissions = [\"echo\", \"store\"]\ntls_names = [\"storeonly.example\"]\n".into(),
        support::peer("legacy", "LEGACY", 1),
    ]
    .concat();
    let mut node = start_mutual_tls(
        &pki,
        &[("DICOMCHAIN__NODE__ALLOW_UNKNOWN_PEERS", "false")],
        &peers,
    );
    let (port, tls_port) = (node.port, node.tls_port());
    let plain_echo = |aet: &str| Scu::echoscu().calling(aet).run(port);
    let tls_echo = |who: &str, aet: &str| {
        dcmtk_tls("echoscu", &pki, Some(who))
            .calling(aet)
            .run(tls_port)
    };

    // TLS required: refused in plain text, accepted over TLS.
    let out = plain_echo("ADMIN");
    assert!(!out.status.success(), "ADMIN associated in plain text");
    assert!(
        support::output_text(&out).contains("Association Rejected"),
        "{}",
        support::output_text(&out)
    );
    assert_ok(&tls_echo("client", "ADMIN"), "ADMIN over TLS");
    // Bound to certificate names: the ADMIN certificate cannot speak for STOREONLY, the
    // certificate whose SAN is bound to it can; nor can STOREONLY use plain text.
    assert!(
        !tls_echo("ADMIN", "STOREONLY").status.success(),
        "a certificate for CN=ADMIN was accepted for AE title STOREONLY"
    );
    assert!(!plain_echo("STOREONLY").status.success());
    assert!(
        !tls_echo("storeonly.example", "STOREONLY").status.success(),
        "the subject CN was accepted although the certificate's DNS SAN names another host"
    );
    assert_ok(
        &tls_echo("storeonly", "STOREONLY"),
        "STOREONLY with its own certificate",
    );
    // A peer without TLS settings keeps plain DICOM.
    assert_ok(&plain_echo("LEGACY"), "LEGACY in plain text");
    // The first refusal from an address is logged and recorded with its reason; the rest of
    // the minute's are summed up on the audit trail (written at the latest when the node stops).
    let log = plain(&node.log());
    assert!(log.contains("may associate only over DICOM TLS"), "{log}");
    node.stop();
    let out = node.run(&["audit", "--json"]);
    assert_ok(&out, "dicomchain audit --json");
    let trail = String::from_utf8_lossy(&out.stdout);
    assert!(trail.contains("association rejected: access control: calling AE title \\\"ADMIN\\\" may associate only over DICOM TLS"), "{trail}");
    assert!(
        trail.contains("3 further association(s) rejected from 127.0.0.1")
            && trail.contains("1x TLS required")
            && trail.contains("2x client certificate not bound to the AE title"),
        "{trail}"
    );
}

/// Issue 23, item 4: `listen = ""` turns the plain listener off.
#[test]
fn the_plain_listener_can_be_turned_off() {
    let keys = tempfile::tempdir().unwrap();
    let pki = Pki::new(keys.path());
    let node = start_mutual_tls(&pki, &[("DICOMCHAIN__NODE__LISTEN", "")], "");
    assert_eq!(node.bound("dicom"), None, "a plain listener was bound");
    // The ready file names the TLS listener's address: the echo below reaches TLS there.
    let tls_port = node.bound("tls").expect("a TLS listener").port();
    assert_ne!(tls_port, 0);
    assert_ok(
        &dcmtk_tls("echoscu", &pki, Some("client")).run(tls_port),
        "echoscu over TLS with the plain listener off",
    );
    assert!(plain(&node.log()).contains("TLS only"), "{}", node.log());
    // With neither listener the node refuses to start, naming the key.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dicomchain.toml");
    std::fs::write(&config, "[node]\nlisten = \"\"\n").unwrap();
    let out = support::dicomchain()
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.listen") && err.contains("would not listen at all"),
        "{err}"
    );
}
