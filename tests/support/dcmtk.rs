//! DCMTK's command-line SCUs (echoscu, storescu, findscu, movescu, getscu at /usr/bin) as the
//! tests run them: one builder, so that a test names only what varies (calling AE title, query
//! keys, TLS credentials) and the command line around it is written once.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::AE;

/// getscu (Patient Root) calling as GETSCU: every instance of patient `patient_id` into
/// `out_dir`, which it creates.
pub fn getscu_patient(port: u16, patient_id: &str, out_dir: &Path) -> Output {
    std::fs::create_dir_all(out_dir).unwrap();
    Scu::getscu()
        .calling("GETSCU")
        .arg("-P")
        .out_dir(out_dir)
        .level("PATIENT")
        .key(format!("PatientID={patient_id}"))
        .run(port)
}

/// One DCMTK SCU run against 127.0.0.1: `TOOL -aec CALLED OPTIONS... 127.0.0.1 PORT FILES...`.
/// The called AE title is the node's unless [`Scu::called`] says otherwise; without
/// [`Scu::calling`] the tool uses its own name as the calling AE title.
pub struct Scu {
    tool: &'static str,
    called: String,
    options: Vec<OsString>,
    files: Vec<OsString>,
}

impl Scu {
    pub fn new(tool: &'static str) -> Scu {
        Scu {
            tool,
            called: AE.to_string(),
            options: Vec::new(),
            files: Vec::new(),
        }
    }

    pub fn echoscu() -> Scu {
        Scu::new("echoscu")
    }

    pub fn storescu() -> Scu {
        Scu::new("storescu")
    }

    pub fn findscu() -> Scu {
        Scu::new("findscu")
    }

    pub fn movescu() -> Scu {
        Scu::new("movescu")
    }

    pub fn getscu() -> Scu {
        Scu::new("getscu")
    }

    /// The calling AE title (`-aet`).
    pub fn calling(self, aet: &str) -> Scu {
        self.args(["-aet", aet])
    }

    /// The called AE title (`-aec`), instead of the node's.
    pub fn called(mut self, aec: &str) -> Scu {
        self.called = aec.to_string();
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Scu {
        self.options.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I>(mut self, args: I) -> Scu
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.options
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// A query or retrieve key: `-k KEY` (return it) or `-k KEY=VALUE` (match it).
    pub fn key(self, key: impl AsRef<OsStr>) -> Scu {
        self.arg("-k").arg(key)
    }

    /// [`Scu::key`] for each of `keys`, in order.
    pub fn keys<I>(self, keys: I) -> Scu
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        keys.into_iter().fold(self, Scu::key)
    }

    /// `-k QueryRetrieveLevel=LEVEL`.
    pub fn level(self, level: &str) -> Scu {
        self.key(format!("QueryRetrieveLevel={level}"))
    }

    /// Where the tool writes what it receives (`-od DIR`: C-FIND responses with `-X`, C-GET
    /// instances).
    pub fn out_dir(self, dir: &Path) -> Scu {
        self.arg("-od").arg(dir)
    }

    /// DICOM TLS with the client key and certificate (`+tls KEY CERT`, no key password), trusting
    /// the server certificates `ca` signed.
    pub fn tls(self, key: &str, cert: &str, ca: &str) -> Scu {
        self.args(["+tls", key, cert]).trust(ca)
    }

    /// DICOM TLS without a client certificate (`+tla`), trusting what `ca` signed.
    pub fn anonymous_tls(self, ca: &str) -> Scu {
        self.arg("+tla").trust(ca)
    }

    fn trust(self, ca: &str) -> Scu {
        self.args(["-pw", "+cf", ca])
    }

    /// Files (or, with `+sd`, directories) to send: storescu's operands after the port.
    pub fn files(mut self, files: &[PathBuf]) -> Scu {
        self.files
            .extend(files.iter().map(|f| f.clone().into_os_string()));
        self
    }

    /// Runs the tool against 127.0.0.1:`port` and waits for it.
    pub fn run(self, port: u16) -> Output {
        let path = format!("/usr/bin/{}", self.tool);
        Command::new(&path)
            .arg("-aec")
            .arg(&self.called)
            .args(&self.options)
            .args(["127.0.0.1", &port.to_string()])
            .args(&self.files)
            .output()
            .unwrap_or_else(|e| panic!("run {path} (apt-get install dcmtk): {e}"))
    }
}
