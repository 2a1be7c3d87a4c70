#!/usr/bin/env bash
# Side-by-side ingest benchmark: DCMTK storescp vs dicomchain (fs backend), same corpus, same
# client (DCMTK storescu, one association over loopback), same run.
#
# usage: benches/compare.sh [COUNT] [SIZE]      (default: 1000 instances of 512x512x16-bit CT)
# (Orthanc and the S3 backend join this table with the performance issue.)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-1000}
SIZE=${2:-512}
work=$(mktemp -d /tmp/dicomchain-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release --quiet
bin=target/release/dicomchain
python3 tests/support/make_series.py "$work/corpus" --modality CT --count "$COUNT" --rows "$SIZE" --cols "$SIZE" --studies 10
mb=$(du -sm "$work/corpus" | cut -f1)

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; return 1; }
send() { # AE PORT -> seconds
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/storescu -aec "$1" +sd +r 127.0.0.1 "$2" "$work/corpus" >/dev/null 2>"$work/storescu.err" || { cat "$work/storescu.err" >&2; return 1; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }' 
}
row() { awk -v n="$1" -v t="$2" -v base="$3" -v c="$COUNT" -v mb="$mb" \
  'BEGIN { printf "%-34s %8.2f s %9.0f inst/s %8.1f MB/s %7.2fx\n", n, t, c / t, mb / t, t / base }'; }

# DCMTK storescp: writes files, no fsync.
p=$(port); mkdir -p "$work/storescp"
TCP_NODELAY=1 /usr/bin/storescp -aet STORESCP -od "$work/storescp" "$p" &
pid=$!
wait_port "$p"
t_scp=$(send STORESCP "$p")
kill "$pid"; wait "$pid" 2>/dev/null || true

# dicomchain, fs backend: every instance split, pixel object fsynced, ledger entry fsynced (WAL).
p=$(port)
cat > "$work/dc.toml" <<TOML
[node]
listen = "127.0.0.1:$p"
[ledger]
path = "$work/dc/ledger"
[store.fs]
root = "$work/dc/objects"
TOML
RUST_LOG=warn "$bin" serve --config "$work/dc.toml" &
pid=$!
wait_port "$p"
t_dc=$(send DICOMCHAIN "$p")
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true

echo
echo "$COUNT CT ${SIZE}x${SIZE} instances ($mb MB), DCMTK storescu, one association, loopback, $(nproc) cores"
printf '%-34s %10s %15s %13s %8s\n' receiver "wall" "rate" "throughput" "vs storescp"
row "DCMTK storescp (no fsync)" "$t_scp" "$t_scp"
row "dicomchain fs (fsync both halves)" "$t_dc" "$t_scp"
