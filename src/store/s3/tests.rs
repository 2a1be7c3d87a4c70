//! The S3 backend against an in-process S3 server (s3s) over real HTTP: single and multipart
//! writes, reads, aborts, retries, timeouts, outages, credentials and staging keys.

use std::time::Instant;

use super::reader::S3Reader;
use super::s3server::S3Server;
use super::upload::S3Upload;
use super::*;

const MIB: usize = 1024 * 1024;

fn config(server: &S3Server) -> S3StoreConfig {
    S3StoreConfig {
        endpoint: server.endpoint.clone(),
        bucket: server.bucket.clone(),
        region: "us-east-1".into(),
        access_key: server.access_key.clone(),
        secret_key: server.secret_key.clone(),
        part_size: 5 * MIB as u64,
        ..S3StoreConfig::default()
    }
}

async fn open(server: &S3Server) -> S3Store {
    S3Store::open(&config(server), Duration::from_secs(10))
        .await
        .unwrap()
}

/// Deterministic, non-repeating-looking bytes, so that a misplaced part is detected.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn put(store: &S3Store, name: &str, data: &[u8]) {
    let mut upload = store.begin().await.unwrap();
    upload.write(data).await.unwrap();
    upload.commit(name).await.unwrap();
}

async fn read_all(store: &S3Store, name: &str) -> Vec<u8> {
    let mut reader = store.open_read(name).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk().await.unwrap() {
        assert!(!chunk.is_empty());
        out.extend_from_slice(&chunk);
    }
    out
}

/// s3s-fs keeps multipart parts as `.upload_id-*` files in its root.
fn pending_parts(server: &S3Server) -> Vec<String> {
    std::fs::read_dir(server.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload_id-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn small_object_round_trips_as_one_put() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let data = pattern(512 * 1024 + 7, 1);
    let mut upload = store.begin().await.unwrap();
    for chunk in data.chunks(16 * 1024 + 3) {
        upload.write(chunk).await.unwrap();
    }
    upload.commit("3fa9c0de").await.unwrap();
    assert_eq!(read_all(&store, "3fa9c0de").await, data);
    assert_eq!(server.object_names(), vec!["3fa9c0de".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_object_and_exactly_one_part() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let upload = store.begin().await.unwrap();
    upload.commit("e0").await.unwrap();
    assert_eq!(read_all(&store, "e0").await, Vec::<u8>::new());
    let data = pattern(5 * MIB, 2);
    put(&store, "e1", &data).await;
    assert_eq!(read_all(&store, "e1").await, data);
    assert!(pending_parts(&server).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_object_round_trips_and_leaves_no_staging_object() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let data = pattern(12 * MIB, 3);
    let mut upload = store.begin().await.unwrap();
    // Odd chunk sizes so that part boundaries fall inside writes.
    let sizes = [1, 4093, 65_537, 1_000_003, 777_777, 3 * MIB + 11];
    let (mut offset, mut i) = (0, 0);
    while offset < data.len() {
        let end = (offset + sizes[i % sizes.len()]).min(data.len());
        upload.write(&data[offset..end]).await.unwrap();
        offset = end;
        i += 1;
    }
    // 12 MiB at 5 MiB parts: two full parts are staged, the third is still buffered.
    assert!(upload.multipart.is_some());
    upload.commit("ab12").await.unwrap();
    assert_eq!(read_all(&store, "ab12").await, data);
    assert_eq!(server.object_names(), vec!["ab12".to_string()]);
    assert!(pending_parts(&server).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn committing_the_same_bytes_twice_leaves_one_object() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let small = pattern(1000, 4);
    put(&store, "cafe", &small).await;
    put(&store, "cafe", &small).await;
    let large = pattern(11 * MIB, 5);
    put(&store, "beef", &large).await;
    put(&store, "beef", &large).await;
    assert_eq!(read_all(&store, "cafe").await, small);
    assert_eq!(read_all(&store, "beef").await, large);
    assert_eq!(
        server.object_names(),
        vec!["beef".to_string(), "cafe".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uploads_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u32 {
        let store = store.clone();
        tasks.spawn(async move {
            let name = format!("{i:04x}");
            let data = pattern(20_000 + i as usize * 1000, i);
            put(&store, &name, &data).await;
            assert_eq!(read_all(&store, &name).await, data);
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    assert_eq!(server.object_names().len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn exists_delete_and_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    assert!(!store.exists("d00d").await.unwrap());
    match store.open_read("d00d").await {
        Err(StoreError::NotFound { name }) => assert_eq!(name, "d00d"),
        Err(e) => panic!("expected NotFound, got {e}"),
        Ok(_) => panic!("expected NotFound, got a reader"),
    }
    put(&store, "d00d", b"x").await;
    assert!(store.exists("d00d").await.unwrap());
    store.delete("d00d").await.unwrap();
    assert!(!store.exists("d00d").await.unwrap());
    // Deleting a missing object is not an error.
    store.delete("d00d").await.unwrap();
    assert!(server.object_names().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let mut small = store.begin().await.unwrap();
    small.write(&pattern(1000, 6)).await.unwrap();
    small.abort().await;
    let mut large = store.begin().await.unwrap();
    large.write(&pattern(11 * MIB, 7)).await.unwrap();
    assert!(large.multipart.is_some());
    large.abort().await;
    assert!(server.object_names().is_empty());
    assert!(pending_parts(&server).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_upload_aborts_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let mut upload = store.begin().await.unwrap();
    upload.write(&pattern(11 * MIB, 8)).await.unwrap();
    drop(upload);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(pending_parts(&server).is_empty() && server.object_names().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "the abandoned upload was not aborted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_is_retried_until_the_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = S3Server::start(dir.path());
    let store = open(&server).await;
    server.stop();
    // Back after the first two retries (200 + 400 ms): the third gets through.
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(450));
        server.restart();
        server
    });
    put(&store, "0a", b"after the outage").await;
    let server = back.join().unwrap();
    assert_eq!(read_all(&store, "0a").await, b"after the outage");
    // With no retries the same outage fails at once.
    let mut server = server;
    server.stop();
    let cfg = S3StoreConfig {
        retries: 0,
        ..config(&server)
    };
    let once = S3Store {
        inner: Arc::new(Inner {
            retries: cfg.retries,
            ..clone_inner(&store)
        }),
    };
    let started = Instant::now();
    let mut up = once.begin().await.unwrap();
    up.write(b"x").await.unwrap();
    let err = up.commit("0b").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(150), "{err}");
    assert!(matches!(err, StoreError::S3 { .. }), "{err}");
}

fn clone_inner(store: &S3Store) -> Inner {
    Inner {
        client: store.inner.client.clone(),
        endpoint: store.inner.endpoint.clone(),
        bucket: store.inner.bucket.clone(),
        part_size: store.inner.part_size,
        timeout: store.inner.timeout,
        retries: store.inner.retries,
    }
}

#[test]
fn only_failures_that_may_pass_are_transient() {
    let http = |status: u16| MinioError::S3Server(S3ServerError::HttpError(status, String::new()));
    assert!(is_transient(&http(503)));
    assert!(is_transient(&http(500)));
    assert!(!is_transient(&http(404)));
    assert!(!is_transient(&http(403)));
    let response = |status: u16| {
        MinioError::S3Server(S3ServerError::S3Error(Box::new(
            minio::s3::minio_error_response::MinioErrorResponse::from_status_and_message(
                status,
                String::new(),
            ),
        )))
    };
    assert!(is_transient(&response(502)));
    let coded = |code: &str| {
        let body = format!("<Error><Code>{code}</Code><Message>m</Message></Error>");
        MinioError::S3Server(S3ServerError::S3Error(Box::new(
            minio::s3::minio_error_response::MinioErrorResponse::new_from_body(
                Bytes::from(body),
                Default::default(),
            )
            .unwrap(),
        )))
    };
    assert!(is_transient(&coded("SlowDown")));
    assert!(is_transient(&coded("InternalError")));
    assert!(!is_transient(&coded("AccessDenied")));
    assert!(has_code(&coded("NoSuchUpload"), "nosuchupload"));
    assert!(!is_transient(&response(404)));
    assert!(!is_transient(&response(400)));
}

#[tokio::test(flavor = "multi_thread")]
async fn open_creates_a_missing_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let cfg = S3StoreConfig {
        bucket: "fresh-bucket".into(),
        ..config(&server)
    };
    let store = S3Store::open(&cfg, Duration::from_secs(10)).await.unwrap();
    assert!(server.root().join("fresh-bucket").is_dir());
    put(&store, "01", b"one").await;
    assert_eq!(read_all(&store, "01").await, b"one");
    // Opening again finds it.
    S3Store::open(&cfg, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let cfg = S3StoreConfig {
        secret_key: "not-the-secret".into(),
        ..config(&server)
    };
    let error = S3Store::open(&cfg, Duration::from_secs(10))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, StoreError::S3 { .. }), "{text}");
    assert!(
        text.contains(&server.bucket) && text.contains(&server.endpoint),
        "{text}"
    );
    assert!(!text.contains("not-the-secret"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_endpoint_fails_within_the_timeout() {
    // A port that was just free: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = S3StoreConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: "dicomchain".into(),
        access_key: "a".into(),
        secret_key: "b".into(),
        part_size: 5 * MIB as u64,
        ..S3StoreConfig::default()
    };
    let timeout = Duration::from_secs(3);
    let started = Instant::now();
    let error = S3Store::open(&cfg, timeout).await.unwrap_err();
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let text = error.to_string();
    assert!(matches!(error, StoreError::S3 { .. }), "{text}");
    assert!(
        text.contains(&cfg.endpoint) && text.contains("dicomchain"),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_times_out() {
    // The kernel accepts connections into the backlog; nobody ever answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = S3StoreConfig {
        endpoint: format!("http://{}", listener.local_addr().unwrap()),
        ..S3StoreConfig::default()
    };
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let error = S3Store::open(&cfg, timeout).await.unwrap_err();
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, StoreError::Timeout { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_fails_promptly_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = S3Server::start(dir.path());
    let cfg = config(&server);
    let timeout = Duration::from_secs(5);
    let store = S3Store::open(&cfg, timeout).await.unwrap();
    put(&store, "aa", b"before").await;

    server.stop();
    let started = Instant::now();
    let mut upload = store.begin().await.unwrap();
    upload.write(b"during").await.unwrap();
    let error = upload.commit("bb").await.unwrap_err();
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, StoreError::S3 { .. }), "{error}");
    assert!(store.open_read("aa").await.is_err());

    server.restart();
    assert_eq!(read_all(&store, "aa").await, b"before");
    put(&store, "bb", b"after").await;
    assert_eq!(read_all(&store, "bb").await, b"after");
}

/// Compile-time check: the node runs these futures on a multi-thread runtime.
#[allow(dead_code)]
fn handles_and_futures_are_send(store: S3Store, mut upload: S3Upload, mut reader: S3Reader) {
    fn send<T: Send>(_: T) {}
    send(S3Store::open(
        &S3StoreConfig::default(),
        Duration::from_secs(1),
    ));
    send(store.begin());
    send(store.open_read("x"));
    send(store.exists("x"));
    send(store.delete("x"));
    send(upload.write(b"x"));
    send(reader.next_chunk());
    send(upload.commit("x"));
    send(store.clone());
    send(reader);
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_keys_are_distinct() {
    let keys: std::collections::HashSet<String> =
        (0..1000).map(|_| upload::staging_key()).collect();
    assert_eq!(keys.len(), 1000);
    let key = keys.iter().next().unwrap();
    assert!(key.starts_with(STAGING_PREFIX) && key.len() == STAGING_PREFIX.len() + 32);
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_does_not_show_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = open(&server).await;
    let shown = format!("{store:?}");
    assert!(
        !shown.contains(&server.secret_key) && !shown.contains(&server.access_key),
        "{shown}"
    );
}
