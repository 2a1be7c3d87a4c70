//! The `dicomchain` binary's commands as the tests run them: against a test node's configuration
//! (admin and ledger commands, `verify`, `audit`) and as a DICOM client of a node (`find`, `move`,
//! `get`, `echo` at study level), each command line written once.

use std::path::Path;
use std::process::{Command, Output};

use super::{Node, AE};

/// The binary under test, with no arguments yet.
pub fn dicomchain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dicomchain"))
}

impl Node {
    /// Runs `dicomchain <args>` with the node's configuration and environment; its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// The security alerts on the node's audit trail (`audit --event 110113 --json`), one JSON
    /// object each.
    pub fn security_alerts(&self) -> Vec<serde_json::Value> {
        let out = self.run(&["audit", "--event", "110113", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The node's plain DICOM listener as the client commands name it: `AE@127.0.0.1:PORT`.
    pub fn target(&self) -> String {
        format!("{AE}@127.0.0.1:{}", self.port)
    }

    /// The CLI's DICOM client commands, calling this node.
    pub fn client(&self) -> Client<'_> {
        Client {
            node: self,
            calling: None,
            target: self.target(),
        }
    }
}

/// `dicomchain [--aet CALLING] find|move|get|echo TARGET ...` with a node's configuration; the
/// queries are at study level.
pub struct Client<'a> {
    node: &'a Node,
    calling: Option<&'a str>,
    target: String,
}

impl<'a> Client<'a> {
    /// The calling AE title (`--aet`), instead of the configured one.
    pub fn calling(mut self, aet: &'a str) -> Client<'a> {
        self.calling = Some(aet);
        self
    }

    /// Another SCP to talk to (`AE@HOST:PORT`, or a peer's name).
    pub fn to(mut self, target: &str) -> Client<'a> {
        self.target = target.to_string();
        self
    }

    /// `dicomchain [--aet CALLING] VERB TARGET`, for more arguments.
    pub fn command(&self, verb: &str) -> Command {
        let mut c = self.node.command();
        if let Some(aet) = self.calling {
            c.args(["--aet", aet]);
        }
        c.args([verb, &self.target]);
        c
    }

    /// `echo TARGET`.
    pub fn echo(&self) -> Output {
        self.command("echo").output().unwrap()
    }

    /// `find TARGET -k QueryRetrieveLevel=STUDY -k StudyInstanceUID -k KEY...`: the studies
    /// `keys` match, with their Study Instance UIDs.
    pub fn find_studies(&self, keys: &[&str]) -> Output {
        let mut c = self.command("find");
        study_keys(&mut c, "StudyInstanceUID");
        for k in keys {
            c.args(["-k", k]);
        }
        c.output().unwrap()
    }

    /// `move TARGET --dest DEST -k QueryRetrieveLevel=STUDY -k StudyInstanceUID=UID`, not yet
    /// started.
    pub fn move_study_command(&self, dest: &str, study_uid: &str) -> Command {
        let mut c = self.command("move");
        c.args(["--dest", dest]);
        study_keys(&mut c, &format!("StudyInstanceUID={study_uid}"));
        c
    }

    /// [`Client::move_study_command`], run to its end.
    pub fn move_study(&self, dest: &str, study_uid: &str) -> Output {
        self.move_study_command(dest, study_uid).output().unwrap()
    }

    /// `get TARGET --out DIR -k QueryRetrieveLevel=STUDY -k StudyInstanceUID=UID`.
    pub fn get_study(&self, out: &Path, study_uid: &str) -> Output {
        let mut c = self.command("get");
        c.arg("--out").arg(out);
        study_keys(&mut c, &format!("StudyInstanceUID={study_uid}"));
        c.output().unwrap()
    }
}

fn study_keys(c: &mut Command, study: &str) {
    c.args(["-k", "QueryRetrieveLevel=STUDY", "-k", study]);
}

/// The Study Instance UID in the output of `dicomchain find`, if it found one.
pub fn study_uid_in(found: &Output) -> Option<String> {
    String::from_utf8_lossy(&found.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("(0020,000D) StudyInstanceUID = ")
                .map(str::to_string)
        })
}
