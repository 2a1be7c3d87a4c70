#!/usr/bin/env bash
# Side-by-side retrieve benchmark, same run, same destination (DCMTK storescp writing files):
#   - storescu pushing the corpus files from disk to storescp (the receiver-bound reference);
#   - C-MOVE of the same instances from dicomchain (every instance rebuilt and checked against
#     the ledger on the way) to storescp, driven by DCMTK movescu;
#   - C-MOVE of the same instances from Orthanc to storescp.
# Each is run RUNS times (default 3); the table shows the median, and every run.
# BENCH_BASE_BIN=PATH adds C-MOVE from another dicomchain binary (say, the build before a change),
# holding the same corpus, measured in the same rotation.
#
# usage: benches/retrieve.sh [COUNT] [SIZE] [RUNS]     (default: 1000 CT 512x512x16-bit, 3 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-1000}
SIZE=${2:-512}
RUNS=${3:-3}
work=$(mktemp -d /tmp/dicomchain-retrieve.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release --quiet
bin=$PWD/target/release/dicomchain
python3 tests/support/make_series.py "$work/corpus" --modality CT --count "$COUNT" --rows "$SIZE" --cols "$SIZE" --studies 10 --patient-id BENCH1
mb=$(du -sm "$work/corpus" | cut -f1)

source benches/lib.sh

# The destination: DCMTK storescp, files only.
scp_port=$(port); mkdir -p "$work/scp"
TCP_NODELAY=1 /usr/bin/storescp -aet STORESCP -od "$work/scp" "$scp_port" &
wait_port "$scp_port"
clear_scp() { find "$work/scp" -type f -delete; }
count_scp() { find "$work/scp" -type f | wc -l; }

# dicomchain with the corpus stored, storescp as a known peer: NAME BINARY VAR (VAR gets its
# port; not a $(...) so that the node stays a job of this shell, stopped on exit).
start_dicomchain() {
  local name=$1 binary=$2 p
  p=$(port)
  mkdir -p "$work/$name"
  cat > "$work/$name.toml" <<TOML
[node]
listen = "127.0.0.1:$p"
allow_unknown_peers = true
[ledger]
path = "$work/$name/ledger"
signing_key_file = "$work/$name/checkpoint.key"
event_spool = "$work/$name/events"
[security]
master_key_file = "$work/$name/master.key"
[admin]
listen = ""
[store.fs]
root = "$work/$name/objects"
[peers.bench]
ae_title = "STORESCP"
host = "127.0.0.1"
port = $scp_port
TOML
  RUST_LOG=warn "$binary" serve --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  wait_port "$p"
  /usr/bin/storescu -aec DICOMCHAIN +sd +r 127.0.0.1 "$p" "$work/corpus" >/dev/null
  printf -v "$3" '%s' "$p"
}
start_dicomchain dc "$bin" dc_port
base_port=""
if [ -n "${BENCH_BASE_BIN:-}" ]; then
  [ -x "$BENCH_BASE_BIN" ] || { echo "BENCH_BASE_BIN: $BENCH_BASE_BIN is not an executable" >&2; exit 2; }
  start_dicomchain base "$BENCH_BASE_BIN" base_port
fi

# Orthanc with the corpus stored, storescp as a modality.
or_port=$(port); or_http=$(port)
cat > "$work/orthanc.json" <<JSON
{ "Name": "bench", "StorageDirectory": "$work/orthanc", "IndexDirectory": "$work/orthanc",
  "DicomAet": "ORTHANC", "DicomPort": $or_port, "HttpPort": $or_http, "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false, "DicomCheckCalledAet": false, "DicomAlwaysAllowStore": true,
  "DicomAlwaysAllowFind": true, "DicomAlwaysAllowMove": true, "DicomAlwaysAllowEcho": true,
  "DicomModalities": { "storescp": [ "STORESCP", "127.0.0.1", $scp_port ] } }
JSON
have_orthanc=0
if [ -x /usr/sbin/Orthanc ]; then
  TCP_NODELAY=1 /usr/sbin/Orthanc "$work/orthanc.json" >"$work/orthanc.log" 2>&1 &
  wait_port "$or_port" && have_orthanc=1
  [ "$have_orthanc" = 1 ] && /usr/bin/storescu -aec ORTHANC +sd +r 127.0.0.1 "$or_port" "$work/corpus" >/dev/null
fi

move() { # AE PORT -> seconds (C-MOVE of the patient's instances to STORESCP)
  local t0 t1
  clear_scp
  t0=$(now)
  /usr/bin/movescu -aec "$1" -aem STORESCP -P -k QueryRetrieveLevel=PATIENT -k PatientID=BENCH1 \
    127.0.0.1 "$2" >"$work/movescu.out" 2>&1 || { cat "$work/movescu.out" >&2; return 1; }
  t1=$(now)
  [ "$(count_scp)" = "$COUNT" ] || { echo "$1: storescp got $(count_scp) of $COUNT" >&2; return 1; }
  elapsed "$t0" "$t1"
}
push() {
  local t0 t1
  clear_scp
  t0=$(now)
  /usr/bin/storescu -aec STORESCP +sd +r 127.0.0.1 "$scp_port" "$work/corpus" >/dev/null
  t1=$(now)
  elapsed "$t0" "$t1"
}

t_push=""; t_dc=""; t_base=""; t_or=""
for _ in $(seq "$RUNS"); do
  t_push="$t_push $(push)"
  t_dc="$t_dc $(move DICOMCHAIN "$dc_port")"
  [ -n "$base_port" ] && t_base="$t_base $(move DICOMCHAIN "$base_port")"
  [ "$have_orthanc" = 1 ] && t_or="$t_or $(move ORTHANC "$or_port")"
done
m_push=$(echo "$t_push" | median)
row() { awk -v n="$1" -v t="$2" -v base="$m_push" -v c="$COUNT" -v mb="$mb" -v all="$3" \
  'BEGIN { printf "%-46s %7.2f s %7.0f inst/s %7.1f MB/s %6.2fx   runs:%s\n", n, t, c / t, mb / t, t / base, all }'; }
echo
echo "$COUNT CT ${SIZE}x${SIZE} instances ($mb MB) to DCMTK storescp, loopback, $(nproc) cores, median of $RUNS"
printf '%-46s %9s %12s %12s %7s\n' sender wall rate throughput "vs push"
row "storescu pushing the files (reference)" "$m_push" "$t_push"
row "dicomchain C-MOVE (rebuilt + checked)" "$(echo "$t_dc" | median)" "$t_dc"
[ -n "$base_port" ] && row "dicomchain-base C-MOVE" "$(echo "$t_base" | median)" "$t_base"
[ "$have_orthanc" = 1 ] && row "Orthanc C-MOVE" "$(echo "$t_or" | median)" "$t_or"
true
