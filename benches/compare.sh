#!/usr/bin/env bash
# Side-by-side ingest benchmark, same corpus, same client (DCMTK storescu), same run:
#   DCMTK storescp (writes files, no fsync), Orthanc, dicomchain on the fs backend and dicomchain on
#   the S3 backend (the test suite's s3s-fs server over HTTP), each started fresh for every
#   measurement; one association, and 4 associations in parallel (the corpus dealt out to 4
#   storescu). Prints wall time, instances/s, MB/s and the ratio to storescp (median of RUNS), and
#   dicomchain's peak RSS; then the C-MOVE comparison (benches/retrieve.sh) when 1000 is a count.
#
# usage: benches/compare.sh [COUNTS] [RUNS] [SIZE]
#        (default: "100 1000 10000" CT instances of 512x512x16-bit in 10 studies, 3 runs)
#
# BENCH_FRESH_FS=1 (root, mkfs.ext4, loop mounts): every measurement's receiver writes to a new
# ext4 file system (with a journal, as mkfs makes it) mounted from an image under $work, made
# before and removed after it; the S3 server's root gets one too. Without it receivers write under $work.
# BENCH_BASE_BIN=PATH adds "dicomchain-base": another dicomchain binary (say, the build before a
# change) on the fs backend, measured in the same runs and rotation as the others.
# BENCH_RECEIVERS="storescp dicomchain-fs ..." measures only those (storescp always: it is the base).
# BENCH_RETRIEVE=0 skips the C-MOVE comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
COUNTS=${1:-"100 1000 10000"}
RUNS=${2:-3}
SIZE=${3:-512}
receivers="storescp dicomchain-fs dicomchain-s3"
[ -x /usr/sbin/Orthanc ] && receivers="storescp orthanc dicomchain-fs dicomchain-s3"
if [ -n "${BENCH_BASE_BIN:-}" ]; then
  [ -x "$BENCH_BASE_BIN" ] || { echo "BENCH_BASE_BIN: $BENCH_BASE_BIN is not an executable" >&2; exit 2; }
  receivers="$receivers dicomchain-base"
fi
if [ -n "${BENCH_RECEIVERS:-}" ]; then
  for r in $BENCH_RECEIVERS; do
    case " $receivers " in *" $r "*) ;; *) echo "BENCH_RECEIVERS: unknown receiver $r (known: $receivers)" >&2; exit 2 ;; esac
  done
  receivers="storescp ${BENCH_RECEIVERS//storescp/}"
fi

work=$(mktemp -d /tmp/dicomchain-compare.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 1; unmount_fs "$work/r"; unmount_fs "$work/s3"; rm -rf "$work"' EXIT

cargo build --release --quiet
cargo build --release --quiet --example s3_test_server
bin=$PWD/target/release/dicomchain

mkdir -p "$work/s3"
target/release/examples/s3_test_server "$work/s3" >"$work/s3.info" &
for _ in $(seq 100); do [ -s "$work/s3.info" ] && break; sleep 0.1; done
read -r s3_endpoint s3_bucket s3_access s3_secret <"$work/s3.info"

# With BENCH_FRESH_FS=1, DIR becomes a new ext4 file system of SIZE_MB (see the header).
fresh_fs() { # DIR SIZE_MB
  mkdir -p "$1"
  [ "${BENCH_FRESH_FS:-0}" = 1 ] || return 0
  local img; img="$work/img.$(basename "$1")"
  # Inode tables and journal written now, not by a kernel thread during the measurement.
  truncate -s "${2}M" "$img" && mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img" && mount -o loop "$img" "$1"
}
# Unmounts DIR if fresh_fs mounted it (lazily if still busy) and removes its image.
unmount_fs() { # DIR
  mountpoint -q "$1" || return 0
  umount "$1" || umount -l "$1"
  rm -f "$work/img.$(basename "$1")"
}
drop_fs() { # DIR
  unmount_fs "$1"
  rm -rf "$1"
}
fs_mb=1024

# start_<receiver> sets rport, rpid and rae; stop_receiver records rss and wipes its state.
start_storescp() {
  rport=$(port); rae=STORESCP; fresh_fs "$work/r" "$fs_mb"
  TCP_NODELAY=1 /usr/bin/storescp -aet STORESCP -od "$work/r" "$rport" & rpid=$!
  wait_port "$rport"
}
start_orthanc() {
  rport=$(port); rae=ORTHANC; fresh_fs "$work/r" "$fs_mb"
  local http; http=$(port)
  cat >"$work/r/o.json" <<JSON
{ "Name": "bench", "StorageDirectory": "$work/r/db", "IndexDirectory": "$work/r/db",
  "DicomAet": "ORTHANC", "DicomPort": $rport, "HttpPort": $http, "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false, "DicomCheckCalledAet": false, "DicomAlwaysAllowStore": true }
JSON
  TCP_NODELAY=1 /usr/sbin/Orthanc "$work/r/o.json" >"$work/o.log" 2>&1 & rpid=$!
  wait_port "$rport"
}
start_dicomchain() { # BACKEND [BINARY]
  rport=$(port); rae=DICOMCHAIN; fresh_fs "$work/r" "$fs_mb"
  cat >"$work/r/dc.toml" <<TOML
[node]
listen = "127.0.0.1:$rport"
allow_unknown_peers = true
[ledger]
path = "$work/r/ledger"
signing_key_file = "$work/r/key"
event_spool = "$work/r/spool"
[store]
backend = "$1"
[store.fs]
root = "$work/r/objects"
[store.s3]
endpoint = "$s3_endpoint"
bucket = "$s3_bucket"
access_key = "$s3_access"
secret_key = "$s3_secret"
TOML
  RUST_LOG=warn "${2:-$bin}" serve --config "$work/r/dc.toml" 2>"$work/node.log" & rpid=$!
  wait_port "$rport"
}
start() {
  case $1 in
    storescp) start_storescp ;;
    orthanc) start_orthanc ;;
    dicomchain-fs) start_dicomchain fs ;;
    dicomchain-base) start_dicomchain fs "$BENCH_BASE_BIN" ;;
    dicomchain-s3) # the server's root, where it stages uploads before renaming them into the bucket
      fresh_fs "$work/s3" "$fs_mb"; mkdir -p "$work/s3/$s3_bucket"; start_dicomchain s3 ;;
  esac
}
stop_receiver() {
  rss=$(peak_rss_mib "$rpid")
  kill -TERM "$rpid"; wait "$rpid" 2>/dev/null || true
  drop_fs "$work/r"
  unmount_fs "$work/s3" # the S3 server's root stays: only its file system goes
  rm -rf "$work/s3/$s3_bucket"; mkdir -p "$work/s3/$s3_bucket"
}
send() { # DIR... -> wall seconds; one storescu per DIR, in parallel
  local t0 t1 pids=() d
  t0=$(now)
  for d in "$@"; do
    /usr/bin/storescu -ta 3600 -aec "$rae" +sd +r 127.0.0.1 "$rport" "$d" >/dev/null 2>>"$work/storescu.err" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { cat "$work/storescu.err" >&2; return 1; }; done
  t1=$(now)
  elapsed "$t0" "$t1"
}

rotate() { # K WORD... -> the words, starting with the K-th (from 0), wrapping around
  local k=$1; shift
  local a=("$@") i
  for ((i = 0; i < ${#a[@]}; i++)); do echo -n "${a[$(((i + k) % ${#a[@]}))]} "; done
}

declare -A t1 t4 rss_max
for count in $COUNTS; do
  corpus="$work/corpus-$count"
  python3 tests/support/make_series.py "$corpus/all" --modality CT --count "$count" --rows "$SIZE" --cols "$SIZE" --studies 10 >/dev/null
  i=0
  for f in "$corpus"/all/*; do
    mkdir -p "$corpus/p$((i % 4))"; ln "$f" "$corpus/p$((i % 4))/"; i=$((i + 1))
  done
  mb=$(du -sm "$corpus/all" | cut -f1)
  fs_mb=$((mb * 3 + 1024))
  for r in $receivers; do t1[$r]=""; t4[$r]=""; rss_max[$r]=0; done
  for run in $(seq "$RUNS"); do
    # Each run starts with the next receiver: a receiver started right after another's files
    # were deleted pays for it on this disk (see docs/PERFORMANCE.md, "Fairness").
    order=$(rotate $((run - 1)) $receivers)
    for r in $order; do
      echo "  $count instances: $r" >&2
      start "$r"; t1[$r]="${t1[$r]} $(send "$corpus/all")"; stop_receiver
      [ "$rss" != "?" ] && [ "$rss" -gt "${rss_max[$r]}" ] && rss_max[$r]=$rss
      start "$r"; t4[$r]="${t4[$r]} $(send "$corpus"/p0 "$corpus"/p1 "$corpus"/p2 "$corpus"/p3)"; stop_receiver
      [ "$rss" != "?" ] && [ "$rss" -gt "${rss_max[$r]}" ] && rss_max[$r]=$rss
    done
  done
  base=$(echo "${t1[storescp]}" | median)
  echo
  echo "$count CT ${SIZE}x${SIZE} instances ($mb MB), DCMTK storescu over loopback, $(nproc) cores, median of $RUNS"
  printf '%-16s | %8s %9s %8s %6s | %8s %9s %6s | %8s\n' receiver "1 assoc" "inst/s" "MB/s" "ratio" "4 assoc" "inst/s" "ratio" "peak RSS"
  for r in $receivers; do
    a=$(echo "${t1[$r]}" | median); b=$(echo "${t4[$r]}" | median)
    awk -v n="$r" -v a="$a" -v b="$b" -v base="$base" -v c="$count" -v mb="$mb" -v rss="${rss_max[$r]} MiB" \
      'BEGIN { printf "%-16s | %7.2fs %9.0f %8.1f %5.2fx | %7.2fs %9.0f %5.2fx | %8s\n", n, a, c / a, mb / a, a / base, b, c / b, b / base, rss }'
  done
  for r in $receivers; do echo "  runs $r: 1 assoc:${t1[$r]} | 4 assoc:${t4[$r]}"; done
  rm -rf "$corpus"
done

[ "${BENCH_RETRIEVE:-1}" = 0 ] && exit 0
case " $COUNTS " in
  *" 1000 "*) echo; benches/retrieve.sh 1000 "$SIZE" "$RUNS" ;;
esac
