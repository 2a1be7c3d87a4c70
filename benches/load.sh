#!/usr/bin/env bash
# Load: COUNT CT instances of SIZExSIZE (default 10 000 of 512x512x16-bit, 5 GB) dealt out to 16
# DCMTK storescu sending at once, to dicomchain (fs backend, release build) and to DCMTK storescp
# (same run, same corpus). Prints wall time, instances/s, MB/s, how many the receiver holds
# afterwards (dicomchain: stored-instance entries on its ledger; storescp: its files), the senders' failures and
# each receiver's peak RSS (goal for dicomchain: < 256 MiB).
#
# usage: benches/load.sh [COUNT] [SIZE] [ASSOCIATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
COUNT=${1:-10000}
SIZE=${2:-512}
N=${3:-16}
work=$(mktemp -d /tmp/dicomchain-load.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cargo build --release --quiet
bin=$PWD/target/release/dicomchain

python3 tests/support/make_series.py "$work/all" --modality CT --count "$COUNT" --rows "$SIZE" --cols "$SIZE" --studies "$N" >/dev/null
i=0
for f in "$work"/all/*; do
  mkdir -p "$work/p$((i % N))"; ln "$f" "$work/p$((i % N))/"; i=$((i + 1))
done
mb=$(du -sm "$work/all" | cut -f1)

send() { # AE PORT -> "seconds failures"
  local t0 t1 pids=() failed=0 d
  t0=$(now)
  for d in "$work"/p*; do
    /usr/bin/storescu -aec "$1" +sd +r 127.0.0.1 "$2" "$d" >/dev/null 2>>"$work/storescu.err" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
  t1=$(now)
  echo "$(elapsed "$t0" "$t1") $failed"
}

rport=$(port); mkdir -p "$work/r"
cat >"$work/r/dc.toml" <<TOML
[node]
listen = "127.0.0.1:$rport"
allow_unknown_peers = true
[ledger]
path = "$work/r/ledger"
signing_key_file = "$work/r/key"
event_spool = "$work/r/spool"
[store.fs]
root = "$work/r/objects"
[admin]
listen = ""
TOML
RUST_LOG=warn "$bin" serve --config "$work/r/dc.toml" 2>"$work/node.log" & rpid=$!
wait_port "$rport"
read -r dc_t dc_fail < <(send DICOMCHAIN "$rport")
dc_rss=$(peak_rss_mib "$rpid")
kill -TERM "$rpid"; wait "$rpid" || true
dc_held=$("$bin" audit --event 110104 --config "$work/r/dc.toml" 2>/dev/null | grep -c "C-STORE received" || true)
rm -rf "$work/r"

rport=$(port); mkdir -p "$work/r"
TCP_NODELAY=1 /usr/bin/storescp -aet STORESCP -od "$work/r" "$rport" & rpid=$!
wait_port "$rport"
read -r sc_t sc_fail < <(send STORESCP "$rport")
sc_rss=$(peak_rss_mib "$rpid")
kill -TERM "$rpid"; wait "$rpid" 2>/dev/null || true
sc_held=$(find "$work/r" -type f | wc -l)

echo
echo "$COUNT CT ${SIZE}x${SIZE} instances ($mb MB), $N DCMTK storescu at once over loopback, $(nproc) cores"
printf '%-12s | %8s %9s %8s | %8s %8s | %8s\n' receiver wall "inst/s" "MB/s" held "failed" "peak RSS"
for r in dicomchain storescp; do
  if [ $r = dicomchain ]; then t=$dc_t f=$dc_fail h=$dc_held m=$dc_rss; else t=$sc_t f=$sc_fail h=$sc_held m=$sc_rss; fi
  awk -v n=$r -v t="$t" -v c="$COUNT" -v mb="$mb" -v h="$h" -v f="$f" -v m="$m MiB" \
    'BEGIN { printf "%-12s | %7.2fs %9.0f %8.1f | %8s %8s | %8s\n", n, t, c / t, mb / t, h, f " senders", m }'
done
grep -c "" "$work/storescu.err" >/dev/null 2>&1 && [ -s "$work/storescu.err" ] && { echo "storescu errors:"; head -5 "$work/storescu.err"; }
exit 0
