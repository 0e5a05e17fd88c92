#!/usr/bin/env bash
# Runs the same sse-load scenarios against sse-gateway and against nginx + nchan (loadtest/nchan/
# nginx.conf.in), each server pinned to CPU 0 (one nchan worker), the load on CPU 1, loopback only,
# and prints each run's SUMMARY line; BENCHMARKS.md quotes the medians.
#
#   loadtest/compare.sh [--runs 3] [--only density,cpu_event,...] [--out DIR] [--skip-install]
#
# Scenarios (names for --only): density cpu_event max_sends pertoken18k publish18k connect heartbeat floor
# batch_cpu batch_max (PROTOCOL §12: the gateway sends batches of 100 to /internal/batch; nchan has no
# batch, so its runs send the same events one request each)
# Every sse-load run is bounded (its own deadlines) and wrapped in `timeout`; nginx is started per run
# and stopped by its master's pid. Needs: cargo build --release -p sse-gateway -p sse-load.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=3
ONLY="density,cpu_event,max_sends,pertoken18k,publish18k,connect,heartbeat,floor,batch_cpu,batch_max"
OUT=${OUT:-/tmp/sse-compare.$$}
INSTALL=1
. "$ROOT/loadtest/bench-lib.sh"
FLOOR=${FLOOR:-$TARGET_DIR/release/sse-floor}
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    *) echo "usage: $0 [--runs N] [--only a,b] [--out DIR] [--skip-install]" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"

if [ "$INSTALL" = 1 ] && ! [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
  apt-cache policy nginx-light libnginx-mod-nchan
  DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light libnginx-mod-nchan
fi
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || { echo "nchan module not installed" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

NGX_DIR=""; NGX_MASTER=""; NGX_WORKER=""; NGX_PORT=""; CB_ADDR=""
# start_nchan HEARTBEAT_SECONDS: nginx+nchan on a free port, its auth/unsubscribe requests going to
# CB_ADDR, where the sse-load run that follows listens (--callback-listen).
start_nchan() {
  NGX_DIR=$(mktemp -d /tmp/nchan.XXXXXX); mkdir -p "$NGX_DIR/tmp"
  NGX_PORT=$(free_port); CB_ADDR=127.0.0.1:$(free_port)
  sed -e "s#@DIR@#$NGX_DIR#g; s#@PORT@#$NGX_PORT#; s#@CALLBACK@#$CB_ADDR#; s#@HEARTBEAT@#$1#; s#@CPU_MASK@#01#" \
    "$ROOT/loadtest/nchan/nginx.conf.in" > "$NGX_DIR/nginx.conf"
  taskset -c "$SERVER_CPU" nginx -p "$NGX_DIR" -c "$NGX_DIR/nginx.conf" &
  NGX_MASTER=$!
  for _ in $(seq 50); do
    NGX_WORKER=$(pgrep -P "$NGX_MASTER" | head -1 || true)
    [ -n "$NGX_WORKER" ] && break; sleep 0.1
  done
  [ -n "$NGX_WORKER" ] || { echo "nginx did not start:"; cat "$NGX_DIR/error.log"; exit 2; }
}
stop_nchan() {
  [ -n "$NGX_MASTER" ] || return 0
  kill -QUIT "$NGX_MASTER" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$NGX_MASTER" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$NGX_MASTER" 2>/dev/null || true
  wait "$NGX_MASTER" 2>/dev/null || true
  NGX_MASTER=""
}
trap stop_nchan EXIT

# run NAME TARGET HEARTBEAT -- sse-load args...: one run, its output in $OUT/NAME.TARGET.N.log
run() {
  local name=$1 target=$2 hb=$3 n=$4; shift 5
  local log="$OUT/$name.$target.$n.log"
  if [ "$target" = gateway ]; then
    timeout 600 "$LOAD" "$@" --gateway-bin "$GATEWAY_BIN" --server-cpu "$SERVER_CPU" --load-cpu "$LOAD_CPU" \
      --gateway-env HEARTBEAT_INTERVAL_SECONDS="$hb" --gateway-env INTERNAL_PORT=0 \
      --gateway-env WORKER_THREADS=1 --join-channel all > "$log" 2>&1 || true
  else
    start_nchan "$hb"
    timeout 600 "$LOAD" "$@" --target nchan --url "http://127.0.0.1:$NGX_PORT" --path '/sub/{c}' \
      --pid "$NGX_WORKER" --callback-listen "$CB_ADDR" --load-cpu "$LOAD_CPU" > "$log" 2>&1 || true
    stop_nchan
  fi
  echo "== $name $target run $n: $(grep -E '^RESULT' "$log" || echo 'no RESULT line')"
  grep -E '^SUMMARY' "$log" >> "$OUT/$name.$target.summaries" || true
}

for n in $(seq "$RUNS"); do
  for target in gateway nchan; do
    want density && run density $target 15 $n -- density --steps 1000,5000,10000,18000 --settle 3
    want cpu_event && run cpu_event $target 15 $n -- unicast -n 1000 -c 8 --rate 5000 --duration 10
    want max_sends && run max_sends $target 15 $n -- unicast -n 1000 -c 8 --rate 0 --duration 10
    want pertoken18k && run pertoken18k $target 15 $n -- broadcast -n 18000 -c 64 --rounds 3 --interval-ms 1000
    want publish18k && run publish18k $target 15 $n -- broadcast -n 18000 --publish --channel all --rounds 3 --interval-ms 1000 --probe-rate 200
    want connect && run connect $target 15 $n -- connect-rate -c 16 --duration 10
    want heartbeat && run heartbeat $target 1 $n -- idle -n 10000 --duration 20 --heartbeat 1
    want batch_cpu && run batch_cpu $target 15 $n -- unicast -n 1000 -c 8 --rate 20000 --batch 100 --duration 10
    want batch_max && run batch_max $target 15 $n -- unicast -n 1000 -c 8 --rate 0 --batch 100 --duration 10
  done
  if want floor; then
    timeout 300 "$FLOOR" -n 18000 --bytes 100 --rounds 5 --server-cpu "$SERVER_CPU" --load-cpu "$LOAD_CPU" \
      > "$OUT/floor.$n.log" 2>&1 || true
    echo "== floor run $n: $(grep -E '^RESULT' "$OUT/floor.$n.log" || echo 'no RESULT line')"
  fi
done
echo "logs and SUMMARY lines in $OUT"
