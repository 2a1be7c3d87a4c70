#!/usr/bin/env bash
# Does store-and-forward slow ingest? Same run, same corpus, same sender (DCMTK storescu, one
# association), a fresh dicomchain node each time:
#   - without forwarding;
#   - with a [[forward]] rule sending every instance on to DCMTK storescp (files only).
# "ingest" is storescu's wall time (every C-STORE acknowledged, i.e. durable on the ledger and in
# the object store); "all forwarded" is from the first C-STORE until storescp holds every
# instance. Each is run RUNS times (default 3); the table shows the median and every run.
#
# usage: benches/forward.sh [COUNT] [SIZE] [RUNS]     (default: 1000 CT 512x512x16-bit, 3 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-1000}
SIZE=${2:-512}
RUNS=${3:-3}
work=$(mktemp -d /tmp/dicomchain-forward.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release --quiet
bin=$PWD/target/release/dicomchain
python3 tests/support/make_series.py "$work/corpus" --modality CT --count "$COUNT" --rows "$SIZE" --cols "$SIZE" --studies 10 --patient-id BENCH1
mb=$(du -sm "$work/corpus" | cut -f1)

source benches/lib.sh

# The destination PACS: DCMTK storescp, files only. In a site the PACS is another machine, so by
# default it writes to memory (/dev/shm) rather than to the disk dicomchain fsyncs to;
# SCP_DIR=DIR puts its files elsewhere (on dicomchain's disk: SCP_DIR=$TMPDIR/x).
scp_dir=${SCP_DIR:-/dev/shm/dicomchain-forward-scp.$$}
mkdir -p "$scp_dir"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work" "$scp_dir"' EXIT
scp_port=$(port)
TCP_NODELAY=1 /usr/bin/storescp -aet STORESCP -od "$scp_dir" "$scp_port" &
wait_port "$scp_port"
count_scp() { find "$scp_dir" -type f | wc -l; }

run() { # FORWARD(0|1) -> "ingest_seconds forwarded_seconds"
  local dir="$work/node" dc_port t0 t1 t2 pid
  rm -rf "$dir"; mkdir -p "$dir"; find "$scp_dir" -type f -delete
  dc_port=$(port)
  cat > "$dir/dc.toml" <<TOML
[node]
listen = "127.0.0.1:$dc_port"
allow_unknown_peers = true
[ledger]
path = "$dir/ledger"
[store.fs]
root = "$dir/objects"
[peers.pacs]
ae_title = "STORESCP"
host = "127.0.0.1"
port = $scp_port
TOML
  [ "$1" = 1 ] && printf '[[forward]]\ndestination = "pacs"\n' >> "$dir/dc.toml"
  RUST_LOG=warn "$bin" serve --config "$dir/dc.toml" 2>"$dir/node.log" &
  pid=$!
  wait_port "$dc_port"
  t0=$(now)
  /usr/bin/storescu -aec DICOMCHAIN +sd +r 127.0.0.1 "$dc_port" "$work/corpus" >/dev/null
  t1=$(now)
  if [ "$1" = 1 ]; then
    for _ in $(seq 6000); do [ "$(count_scp)" -ge "$COUNT" ] && break; sleep 0.02; done
    [ "$(count_scp)" -ge "$COUNT" ] || { echo "storescp got $(count_scp) of $COUNT" >&2; cat "$dir/node.log" >&2; return 1; }
  fi
  t2=$(now)
  kill -TERM "$pid"; wait "$pid" || true
  echo "$(elapsed "$t0" "$t1") $(elapsed "$t0" "$t2")"
}

plain=""; fwd_ingest=""; fwd_all=""
for _ in $(seq "$RUNS"); do
  read -r a _ <<<"$(run 0)"; plain="$plain $a"
  read -r a b <<<"$(run 1)"; fwd_ingest="$fwd_ingest $a"; fwd_all="$fwd_all $b"
done
m_plain=$(echo "$plain" | median)
row() { awk -v n="$1" -v t="$2" -v base="$m_plain" -v c="$COUNT" -v mb="$mb" -v all="$3" \
  'BEGIN { printf "%-44s %7.2f s %7.0f inst/s %7.1f MB/s %6.2fx   runs:%s\n", n, t, c / t, mb / t, t / base, all }'; }
echo
echo "$COUNT CT ${SIZE}x${SIZE} instances ($mb MB), storescu -> dicomchain (fs), storescp files in $scp_dir, $(nproc) cores, median of $RUNS"
printf '%-44s %9s %12s %12s %7s\n' "" wall rate throughput "vs plain"
row "ingest, no forwarding" "$m_plain" "$plain"
row "ingest, forwarding to storescp" "$(echo "$fwd_ingest" | median)" "$fwd_ingest"
row "all forwarded (storescp holds every one)" "$(echo "$fwd_all" | median)" "$fwd_all"
