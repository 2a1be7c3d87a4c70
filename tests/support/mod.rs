//! The shared test harness: runs the real `dicomchain` binary on a free port in a temp
//! directory, and drives it with real DICOM clients (DCMTK, pynetdicom) and the real CLI.

#![allow(dead_code)]

pub mod cli;
pub mod dcmtk;
pub mod s3server;

pub use cli::{dicomchain, study_uid_in};
pub use dcmtk::Scu;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const AE: &str = "DICOMCHAIN";

/// Each listener a node reports in its `--ready-file`, and the variable that pins its address.
const LISTENERS: [(&str, &str); 3] = [
    ("dicom", "DICOMCHAIN__NODE__LISTEN"),
    ("tls", "DICOMCHAIN__NODE__TLS__LISTEN"),
    ("admin", "DICOMCHAIN__ADMIN__LISTEN"),
];

/// A running node (the real binary) with its own state directory.
pub struct Node {
    pub port: u16,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
}

/// A port on 127.0.0.1 that nothing listens on, held for as long as the socket lives (bound, never
/// listening: no other process can take it, and connections to it are refused).
pub fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A free port for a server that cannot bind port 0 and report what it got (DCMTK's storescp,
/// Orthanc): found by binding port 0 and letting it go, so another process may take it first.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A known peer's table in a node's configuration: `[peers.NAME]`, its AE title and its port on
/// 127.0.0.1. More keys of the same peer may follow it.
pub fn peer(name: &str, ae: &str, port: u16) -> String {
    format!("[peers.{name}]\nae_title = \"{ae}\"\nhost = \"127.0.0.1\"\nport = {port}\n")
}

impl Node {
    /// Starts a node on the embedded default backend.
    pub fn start() -> Node {
        Node::start_with_env(&[])
    }

    /// Starts a node with `DICOMCHAIN__…` overrides in its environment.
    pub fn start_with_env(env: &[(&str, &str)]) -> Node {
        Node::start_with(env, "")
    }

    /// Starts a node with known peers: (name, AE title, port on 127.0.0.1).
    pub fn start_with_peers(peers: &[(&str, &str, u16)]) -> Node {
        let toml: String = peers
            .iter()
            .map(|(name, ae, port)| peer(name, ae, *port))
            .collect();
        Node::start_with(&[], &toml)
    }

    /// Starts a node with its admin listener (on port 0: see [`Node::admin_port`]).
    pub fn start_with_admin() -> Node {
        Node::start_with(&[], "[admin]\nlisten = \"127.0.0.1:0\"\n")
    }

    /// Starts a node that signs a checkpoint every second (`ledger.checkpoint_interval = 1`).
    pub fn checkpointing() -> Node {
        Node::start_with_env(&[("DICOMCHAIN__LEDGER__CHECKPOINT_INTERVAL", "1")])
    }

    /// Starts a node with environment overrides and extra TOML appended to its configuration.
    pub fn start_with(env: &[(&str, &str)], extra_toml: &str) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix("dicomchain-test-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        // Port 0: the node binds a free port itself and reports it in its ready file, so no
        // other process can take the port between a probe and the bind. Tests give their TLS and
        // admin listeners port 0 as well.
        std::fs::write(
            dir.join("dicomchain.toml"),
            format!(
                "[node]\nlisten = \"127.0.0.1:0\"\ndrain_timeout_secs = 10\nallow_unknown_peers = true\n[ledger]\npath = \"{}\"\n[store.fs]\nroot = \"{}\"\n{extra_toml}",
                dir.join("ledger").display(),
                dir.join("objects").display()
            ),
        )
        .unwrap();
        let mut node = Node {
            port: 0,
            dir,
            _tmp: Some(tmp),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            starts: 0,
        };
        node.spawn();
        node
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("dicomchain.toml")
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("node-{n}.log"))
    }

    /// Everything the node has logged, across restarts.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn command(&self) -> Command {
        let mut c = dicomchain();
        c.arg("--config")
            .arg(self.config_path())
            .current_dir(&self.dir);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn ready_path(&self) -> PathBuf {
        self.dir.join("ready")
    }

    /// The address a listener of the running node bound (`dicom`, `tls`, `admin`), from its
    /// `--ready-file`; `None` when it has no such listener.
    pub fn bound(&self, name: &str) -> Option<std::net::SocketAddr> {
        std::fs::read_to_string(self.ready_path())
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}="))?.parse().ok())
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let _ = std::fs::remove_file(self.ready_path());
        let log = std::fs::File::create(self.log_path(self.starts)).unwrap();
        let child = self
            .command()
            .arg("serve")
            .arg("--ready-file")
            .arg(self.ready_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dicomchain");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default();
            if self.ready_path().exists() {
                self.pin_listeners();
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node exited at start ({status}):\n{text}");
            }
            assert!(Instant::now() < deadline, "node did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts keep the addresses the node got at its first start, and the CLI's commands (the
    /// admin API's client) reach the addresses it bound.
    fn pin_listeners(&mut self) {
        for (name, var) in LISTENERS {
            if let Some(a) = self.bound(name) {
                self.env.retain(|(k, _)| k != var);
                self.env.push((var.to_string(), a.to_string()));
            }
        }
        if let Some(a) = self.bound("dicom") {
            self.port = a.port();
        }
    }

    /// The port of the node's admin listener (configured on port 0: see [`Node::bound`]).
    pub fn admin_port(&self) -> u16 {
        self.bound("admin").expect("an admin listener").port()
    }

    /// The port of the node's DICOM TLS listener.
    pub fn tls_port(&self) -> u16 {
        self.bound("tls").expect("a DICOM TLS listener").port()
    }

    /// Polls `f` every 200 ms until it returns `Some`, for at most `secs` seconds; fails naming
    /// `what`, with the node's log.
    pub fn wait_for<T>(&self, secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nnode log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            match terminate(&mut child, Duration::from_secs(60)) {
                Some(status) => assert!(
                    status.success(),
                    "node exited with {status}:\n{}",
                    self.log()
                ),
                None => {
                    let _ = child.kill();
                    panic!("node did not stop within 60 s:\n{}", self.log());
                }
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (`TERM`, `KILL`) to the running node without waiting for it, so that
    /// another thread may go on using the node meanwhile.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid().expect("node running"), signal);
    }

    /// Waits for a node that was told to stop; asserts it exited cleanly.
    pub fn wait_exit_ok(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "node exited with {status}:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the node if it runs, and starts it again on the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs `dicomchain export <args> --out <out>`.
    pub fn export(&self, args: &[&str], out: &Path) -> Output {
        self.command()
            .arg("export")
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    }

    /// DCMTK echoscu, calling as ECHOSCU.
    pub fn echoscu(&self) -> Output {
        Scu::echoscu().run(self.port)
    }

    /// DCMTK storescu over one association, calling as STORESCU; `extra` are storescu options.
    pub fn storescu(&self, extra: &[&str], files: &[PathBuf]) -> Output {
        Scu::storescu()
            .calling("STORESCU")
            .args(extra)
            .files(files)
            .run(self.port)
    }

    /// pynetdicom, sending each file's data set exactly as stored. Returns (status, path) pairs.
    pub fn send_exact(&self, files: &[PathBuf]) -> Vec<(Option<u16>, PathBuf)> {
        self.send_exact_with_timeout(files, 120)
    }

    /// `send_exact` that gives up on a silent peer after `timeout_secs` (for crash tests).
    pub fn send_exact_with_timeout(
        &self,
        files: &[PathBuf],
        timeout_secs: u32,
    ) -> Vec<(Option<u16>, PathBuf)> {
        send_exact_to(self.port, AE, files, timeout_secs)
    }
}

/// tests/support/send_exact.py (pynetdicom) to an SCP on 127.0.0.1, not yet started: it sends
/// each file's data set exactly as stored, over one association, and prints a line `STATUS PATH`
/// per file; it gives up on a silent peer after `timeout_secs`.
pub fn send_exact_command(
    port: u16,
    called_ae: &str,
    files: &[PathBuf],
    timeout_secs: u32,
) -> Command {
    let mut c = script("send_exact.py");
    c.args(["127.0.0.1", &port.to_string(), called_ae])
        .args(files)
        .env("SEND_EXACT_DIMSE_TIMEOUT", timeout_secs.to_string());
    c
}

/// pynetdicom to any SCP on 127.0.0.1, sending each file's data set exactly as stored. Returns
/// (status, path) pairs.
pub fn send_exact_to(
    port: u16,
    called_ae: &str,
    files: &[PathBuf],
    timeout_secs: u32,
) -> Vec<(Option<u16>, PathBuf)> {
    let out = send_exact_command(port, called_ae, files, timeout_secs)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "send_exact.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (code, rest) = l.split_once(' ')?;
            let path = rest.split(' ').next()?;
            Some((u16::from_str_radix(code, 16).ok(), PathBuf::from(path)))
        })
        .collect()
}

/// Sends `signal` (`TERM`, `KILL`) to process `pid`, as `kill -SIGNAL PID` does.
pub fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// SIGTERM, then waits up to `within` for the process to exit: its status, or `None` if it still
/// runs.
fn terminate(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    send_signal(child.id(), "TERM");
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// DCMTK's storescp in bit-preserving mode, as a reference receiver: it records the data set
/// bytes exactly as they came off the wire.
pub struct Storescp {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Storescp {
    /// storescp on a free port: it cannot bind port 0 and report what it got, so the port is
    /// probed first, and probed again should another process take it meanwhile.
    pub fn start() -> Storescp {
        (0..5)
            .find_map(|_| Storescp::launch(free_port()))
            .expect("storescp could not listen on a free port")
    }

    /// storescp on a given port (to bring a destination back where it was).
    pub fn start_on(port: u16) -> Storescp {
        Storescp::launch(port).unwrap_or_else(|| panic!("storescp could not listen on {port}"))
    }

    /// storescp listening on `port`, or `None` if it exited (the port was taken).
    fn launch(port: u16) -> Option<Storescp> {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("/usr/bin/storescp")
            .args(["-aet", "STORESCP", "+B", "+xa", "-od"])
            .arg(dir.path())
            .arg(port.to_string())
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run /usr/bin/storescp (apt-get install dcmtk)");
        wait_listening(&mut child, &[port], Duration::from_secs(30), "storescp")
            .then_some(Storescp { port, dir, child })
    }

    /// Everything storescp has recorded so far.
    pub fn received(&self) -> Vec<Part10> {
        files_under(self.dir.path())
            .iter()
            .filter_map(|p| read_part10(p))
            .collect()
    }

    /// How many files storescp has written so far (cheap: no parsing).
    pub fn count(&self) -> usize {
        files_under(self.dir.path()).len()
    }

    pub fn clear(&self) {
        for f in files_under(self.dir.path()) {
            std::fs::remove_file(f).unwrap();
        }
    }

    /// Sends one file with storescu and returns what storescp recorded, if anything.
    pub fn receive(&self, file: &Path, storescu_options: &[&str]) -> Option<Part10> {
        for f in files_under(self.dir.path()) {
            std::fs::remove_file(f).unwrap();
        }
        let _ = Scu::storescu()
            .called("STORESCP")
            .args(storescu_options)
            .files(&[file.to_path_buf()])
            .run(self.port);
        let got = files_under(self.dir.path());
        got.first().and_then(|p| read_part10(p))
    }
}

/// Waits until `child` listens on every one of `ports` (its own sockets, not whoever answers
/// there): false if it exits first; fails after `within`.
fn wait_listening(child: &mut Child, ports: &[u16], within: Duration, what: &str) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if ports.iter().all(|p| listens_on(child.id(), *p)) {
            return true;
        }
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` holds a listening TCP socket on `port`: the socket inodes among its
/// descriptors (/proc/PID/fd) against the listening sockets of /proc/net/tcp and tcp6.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: std::collections::HashSet<String> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // sl, local address (hex IP:port), remote address, state (0A: LISTEN), ..., inode
                f.len() > 9
                    && f[3] == "0A"
                    && f[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
                    && inodes.contains(f[9])
            })
    })
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Orthanc (Debian's /usr/sbin/Orthanc) as a real PACS: its own temp directory, DICOM port and
/// REST port; stopped and started again on the same storage.
pub struct Orthanc {
    pub dicom_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Orthanc {
    /// Orthanc on two free ports, probed as for [`Storescp::start`].
    pub fn start() -> Orthanc {
        (0..5)
            .find_map(|_| Orthanc::launch(free_port(), free_port()))
            .expect("Orthanc could not listen on free ports")
    }

    /// Orthanc listening on its two ports, or `None` if it exited (a port was taken).
    fn launch(dicom_port: u16, http_port: u16) -> Option<Orthanc> {
        let dir = tempfile::Builder::new()
            .prefix("orthanc-test-")
            .tempdir()
            .unwrap();
        let cfg = serde_json::json!({
            "Name": "test", "StorageDirectory": dir.path().join("db"),
            "IndexDirectory": dir.path().join("db"), "DicomAet": "ORTHANC",
            "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false, "DicomCheckCalledAet": false,
            "DicomAlwaysAllowStore": true, "DicomAlwaysAllowEcho": true,
            "DicomAlwaysAllowFind": true, "UnknownSopClassAccepted": true,
        });
        std::fs::write(dir.path().join("orthanc.json"), cfg.to_string()).unwrap();
        let mut o = Orthanc {
            dicom_port,
            http_port,
            dir,
            child: None,
        };
        o.spawn().then_some(o)
    }

    /// Starts Orthanc again on the same storage and ports.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "Orthanc already runs");
        assert!(
            self.spawn(),
            "Orthanc exited at start (its port taken?):\n{}",
            std::fs::read_to_string(self.dir.path().join("orthanc.log")).unwrap_or_default()
        );
    }

    /// Runs Orthanc on its configuration until it listens on both ports: false if it exits.
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("orthanc.log"))
            .unwrap();
        let child = Command::new("/usr/sbin/Orthanc")
            .arg(self.dir.path().join("orthanc.json"))
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run /usr/sbin/Orthanc (apt-get install orthanc)");
        let child = self.child.insert(child);
        let ports = [self.http_port, self.dicom_port];
        wait_listening(child, &ports, Duration::from_secs(60), "Orthanc")
    }

    /// Stops Orthanc (SIGTERM, then waits): the destination goes away.
    pub fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            if terminate(&mut child, Duration::from_secs(30)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// SOP Instance UID → SHA-256 (hex) of the data set bytes Orthanc stored, via its REST API.
    pub fn instances(&self) -> std::collections::BTreeMap<String, String> {
        let out = script("orthanc_instances.py")
            .arg(self.http_port.to_string())
            .output()
            .expect("python3");
        assert_ok(&out, "orthanc_instances.py");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// XORs byte `at` of `file` with `mask`, where it lies on disk: a tampered or damaged object.
pub fn xor_byte(file: &Path, at: usize, mask: u8) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[at] ^= mask;
    std::fs::write(file, bytes).unwrap();
}

/// SHA-256 (hex) of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A Part 10 file, split into what matters for comparisons.
#[derive(Debug, Clone)]
pub struct Part10 {
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// The data set bytes after the File Meta Information group.
    pub dataset: Vec<u8>,
}

fn trim(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// Reads a Part 10 file (PS3.10 §7.1): preamble, "DICM", group 0002 in Explicit VR LE.
pub fn read_part10(path: &Path) -> Option<Part10> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return None;
    }
    let mut pos = 132;
    let (mut sop_class_uid, mut sop_instance_uid, mut transfer_syntax) = (None, None, None);
    while pos + 8 <= bytes.len() && u16::from_le_bytes([bytes[pos], bytes[pos + 1]]) == 2 {
        let elem = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        let vr = &bytes[pos + 4..pos + 6];
        let (len, header) = if matches!(vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT" | b"UC" | b"UR") {
            (
                u32::from_le_bytes(bytes.get(pos + 8..pos + 12)?.try_into().ok()?) as usize,
                12,
            )
        } else {
            (
                u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]]) as usize,
                8,
            )
        };
        let value = bytes.get(pos + header..pos + header + len)?;
        match elem {
            0x0002 => sop_class_uid = Some(trim(value)),
            0x0003 => sop_instance_uid = Some(trim(value)),
            0x0010 => transfer_syntax = Some(trim(value)),
            _ => {}
        }
        pos += header + len;
    }
    Some(Part10 {
        path: path.to_path_buf(),
        sop_class_uid: sop_class_uid?,
        sop_instance_uid: sop_instance_uid?,
        transfer_syntax: transfer_syntax?,
        dataset: bytes[pos..].to_vec(),
    })
}

/// pydicom's test corpus: every Part 10 file of a Storage SOP Class under `test_files` and
/// `charset_files`. Empty when pydicom is not installed (CI installs it).
pub fn pydicom_corpus() -> Vec<Part10> {
    let Some(root) = pydicom_data() else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for sub in ["test_files", "charset_files"] {
        walk(&root.join(sub), &mut files);
    }
    files.sort();
    files
        .iter()
        .filter_map(|p| read_part10(p))
        .filter(|p| dicomchain::dimse::negotiate::is_storage_sop_class(&p.sop_class_uid))
        .collect()
}

/// pydicom's `data` directory (test_files, charset_files), when pydicom is installed.
pub fn pydicom_data() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import pydicom, os; print(os.path.dirname(pydicom.__file__))",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("data"))
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

/// `python3 tests/support/NAME`, for more arguments.
pub fn script(name: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(support_file(name));
    c
}

/// A file of the test support directory (scripts, query sets).
pub fn support_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
}

/// Writes the small, varied C-FIND/C-MOVE corpus (tests/support/make_find_corpus.py) into
/// `dir`; returns its files, sorted.
pub fn make_find_corpus(dir: &Path) -> Vec<PathBuf> {
    let st = script("make_find_corpus.py")
        .arg(dir)
        .status()
        .expect("python3");
    assert!(st.success(), "make_find_corpus.py failed");
    let mut files = files_under(dir);
    files.sort();
    files
}

/// Generates a synthetic series with tests/support/make_series.py.
pub fn make_series(
    out: &Path,
    modality: &str,
    count: usize,
    size: usize,
    extra: &[&str],
) -> Vec<PathBuf> {
    let st = script("make_series.py")
        .arg(out)
        .args(["--modality", modality, "--count", &count.to_string()])
        .args(["--rows", &size.to_string(), "--cols", &size.to_string()])
        .args(extra)
        .status()
        .expect("python3");
    assert!(st.success(), "make_series.py failed");
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// A synthetic CT series of `count` instances of `size` x `size` pixels (one study, one patient),
/// in a temporary directory that lasts as long as the returned handle.
pub fn ct_series(count: usize, size: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let files = make_series(dir.path(), "CT", count, size, &[]);
    (dir, files)
}

/// The last component of a path, as text.
pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    walk(dir, &mut v);
    v.sort();
    v
}

/// A process's stdout and stderr, one after the other.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Peak resident memory of a process (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .expect("VmHWM")
}

/// Asserts a process succeeded, showing its output otherwise.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plain HTTP/1.1 GET on 127.0.0.1:`port`: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_with(port, path, None)
}

/// [`http_get`] with `Authorization: Bearer <token>` (the admin API).
pub fn http_get_with(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// A connection to 127.0.0.1:`port` from the loopback address `from` (any 127/8 address works
/// on Linux), so that a test's attackers can come from sources of their own; TCP_NODELAY set.
pub async fn connect_from(
    from: std::net::IpAddr,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        socket.connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    {
        Ok(Ok(s)) => {
            s.set_nodelay(true)?;
            Ok(s)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}
