//! An in-process S3 server for tests: `s3s-fs` over a directory, with SigV4 authentication, served
//! over HTTP/1.1 on an ephemeral 127.0.0.1 port.
//!
//! The server runs on its own thread with its own multi-thread tokio runtime, so it serves the same
//! way whether the test is a plain `#[test]` or a `#[tokio::test]` of either flavour (a blocking
//! test thread or a busy current-thread runtime cannot starve it).
//!
//! [`S3Server::stop`] closes the listener *and* every open connection, so that a client's pooled
//! keep-alive connection cannot keep working after the "outage": the next request fails with
//! connection refused, exactly like a dead MinIO. [`S3Server::restart`] serves again on the same
//! port and root, so a client configured with [`S3Server::endpoint`] recovers without reconfiguring.
//!
//! This file is shared by the library's unit tests (through `#[path]`) and by the integration test
//! binary, so it must not use the `dicomchain` crate.

#![allow(dead_code)] // each including crate uses a different subset

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::sync::watch;

/// Fixed test credentials: the server only accepts requests signed with these.
const ACCESS_KEY: &str = "dicomchain-test-access";
const SECRET_KEY: &str = "dicomchain-test-secret-0123456789";
const BUCKET: &str = "dicomchain-test";

/// A running (or stopped) in-process S3 server.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// A bucket that exists when the server starts.
    pub bucket: String,
    root: PathBuf,
    addr: SocketAddr,
    running: Option<Running>,
}

/// What only exists while the server is serving.
struct Running {
    /// Sending (or dropping) this tells the accept loop and every connection task to stop.
    shutdown: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

impl S3Server {
    /// Starts a server storing its objects under `root` (which must exist), on an ephemeral port.
    pub fn start(root: &Path) -> S3Server {
        let root = root.canonicalize().expect("S3 test server root must exist");
        // s3s-fs maps bucket `b` to the directory `root/b`.
        std::fs::create_dir_all(root.join(BUCKET)).expect("create the test bucket directory");
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let addr = listener
            .local_addr()
            .expect("local address of the listener");
        let mut server = S3Server {
            endpoint: format!("http://{addr}"),
            access_key: ACCESS_KEY.to_string(),
            secret_key: SECRET_KEY.to_string(),
            bucket: BUCKET.to_string(),
            root,
            addr,
            running: None,
        };
        server.running = Some(serve(listener, server.root.clone()));
        server
    }

    /// Stops accepting and drops every open connection. Idempotent.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(true);
            // Joining guarantees that the listener is closed and the connections are gone when
            // stop() returns, so the caller's next request deterministically sees the outage.
            let _ = running.thread.join();
        }
    }

    /// Serves again on the same port and root (after [`stop`](S3Server::stop); restarting a
    /// running server restarts it).
    pub fn restart(&mut self) {
        self.stop();
        // std sets SO_REUSEADDR on Unix, so the port is free again although the connections we
        // just closed linger in TIME_WAIT.
        let listener = StdTcpListener::bind(self.addr).expect("rebind the same port");
        self.running = Some(serve(listener, self.root.clone()));
    }

    /// Whether the server is currently serving.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The keys of the objects present in the bucket, sorted. Walks the directory, so it also works
    /// while the server is stopped.
    pub fn object_names(&self) -> Vec<String> {
        let bucket_dir = self.root.join(&self.bucket);
        let mut names = Vec::new();
        walk(&bucket_dir, "", &mut names);
        names.sort();
        names
    }

    /// The directory the server stores into.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop()
    }
}

/// Collects the object keys under `dir` (keys with `/` are nested directories in s3s-fs).
fn walk(dir: &Path, prefix: &str, names: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            // Deleting `a/b` leaves an empty directory `a`; directories are not objects.
            walk(&entry.path(), &format!("{prefix}{name}/"), names);
        } else if !is_internal(&name) {
            names.push(format!("{prefix}{name}"));
        }
    }
}

/// s3s-fs keeps its temporary files, multipart parts and metadata sidecars in the root directory,
/// next to (not inside) the bucket directories; this filter only guards against a future version
/// moving them.
fn is_internal(file_name: &str) -> bool {
    (file_name.starts_with(".tmp.") && file_name.ends_with(".internal.part"))
        || file_name.starts_with(".upload")
        || file_name.starts_with(".bucket-")
}

/// s3s-fs over the test root, with one fix: S3 (AWS, MinIO) treats an empty `delimiter=` as no
/// delimiter, and the minio client sends one for every recursive listing; s3s-fs 0.14 groups
/// keys on it instead (every key becomes a one-character common prefix). The wrapper drops an
/// empty delimiter and forwards everything else unchanged.
struct EmptyDelimiterIsNone(s3s_fs::FileSystem);

macro_rules! forward {
    ($($name:ident: $input:ident => $output:ident),* $(,)?) => {
        $(
            // What `#[async_trait]` makes of an `async fn` (it does not see into macros).
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                req: s3s::S3Request<s3s::dto::$input>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = s3s::S3Result<s3s::S3Response<s3s::dto::$output>>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                self.0.$name(req)
            }
        )*
    };
}

#[async_trait::async_trait]
impl s3s::S3 for EmptyDelimiterIsNone {
    forward! {
        create_bucket: CreateBucketInput => CreateBucketOutput,
        copy_object: CopyObjectInput => CopyObjectOutput,
        delete_bucket: DeleteBucketInput => DeleteBucketOutput,
        delete_object: DeleteObjectInput => DeleteObjectOutput,
        delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
        get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
        get_object: GetObjectInput => GetObjectOutput,
        head_bucket: HeadBucketInput => HeadBucketOutput,
        head_object: HeadObjectInput => HeadObjectOutput,
        list_buckets: ListBucketsInput => ListBucketsOutput,
        put_object: PutObjectInput => PutObjectOutput,
        create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
        upload_part: UploadPartInput => UploadPartOutput,
        upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput,
        list_parts: ListPartsInput => ListPartsOutput,
        complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
        abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
    }

    async fn list_objects(
        &self,
        mut req: s3s::S3Request<s3s::dto::ListObjectsInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::ListObjectsOutput>> {
        req.input.delimiter = req.input.delimiter.filter(|d| !d.is_empty());
        self.0.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        mut req: s3s::S3Request<s3s::dto::ListObjectsV2Input>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::ListObjectsV2Output>> {
        req.input.delimiter = req.input.delimiter.filter(|d| !d.is_empty());
        self.0.list_objects_v2(req).await
    }
}

/// Spawns the server thread serving `listener`.
fn serve(listener: StdTcpListener, root: PathBuf) -> Running {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let (shutdown, shutdown_rx) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("s3-test-server".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("S3 test server runtime");
            runtime.block_on(accept_loop(listener, root, shutdown_rx));
            // Cancels whatever is left (connection tasks that were between two polls) and waits a
            // little for s3s-fs's blocking file operations.
            runtime.shutdown_timeout(Duration::from_secs(5));
        })
        .expect("spawn the S3 test server thread");
    Running { shutdown, thread }
}

async fn accept_loop(listener: StdTcpListener, root: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs over the test root");
    let service = {
        let mut builder = S3ServiceBuilder::new(EmptyDelimiterIsNone(fs));
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        builder.build()
    };
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // E.g. EMFILE: keep serving the connections we have.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // The client sets TCP_NODELAY too; without it on both sides small request/response
        // exchanges stall on Nagle + delayed ACK.
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let builder = ConnBuilder::new(TokioExecutor::new()).http1_only();
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // Dropping the connection future closes the socket, even mid-request or idle in
            // keep-alive: that is what makes stop() a real outage for pooled client connections.
            tokio::select! {
                _ = conn => {}
                _ = conn_shutdown.changed() => {}
            }
        });
    }
    // `listener` is dropped here: new connections are refused from now on.
}
