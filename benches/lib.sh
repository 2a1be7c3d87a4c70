# Shell helpers shared by the benchmark scripts (sourced, not run).
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits until something listens on 127.0.0.1:PORT, without connecting (a probe connection can
# keep a single-threaded receiver such as storescp busy while the real client waits).
wait_port() {
  for _ in $(seq 600); do
    if command -v ss >/dev/null; then
      [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ] && return 0
    else
      (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    fi
    sleep 0.05
  done
  echo "port $1 not up" >&2; return 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
# Peak resident set of a process, in MiB (VmHWM).
peak_rss_mib() { awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"; }
