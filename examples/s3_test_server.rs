//! A local S3 server for benchmarks (`benches/compare.sh`): the test suite's `s3s-fs` server
//! (SigV4, HTTP/1.1), run until killed. Prints `ENDPOINT BUCKET ACCESS_KEY SECRET_KEY` on one line.
//!
//! usage: cargo run --release --example s3_test_server -- ROOT_DIR

#[path = "../tests/support/s3server.rs"]
mod s3server;

fn main() {
    let root = std::env::args()
        .nth(1)
        .expect("usage: s3_test_server ROOT_DIR");
    std::fs::create_dir_all(&root).expect("create the root directory");
    let server = s3server::S3Server::start(std::path::Path::new(&root));
    println!(
        "{} {} {} {}",
        server.endpoint, server.bucket, server.access_key, server.secret_key
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
