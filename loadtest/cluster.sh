#!/usr/bin/env bash
# The load figures of issue 9 (PROTOCOL §10, several gateways joined by Redis): each scenario on one
# gateway and on a cluster, side by side in the same run, alternating, --runs times; every run's log
# and SUMMARY line under --out. loadtest/cluster-table.py turns them into medians and verdicts.
#
#   loadtest/cluster.sh [--runs 3] [--only publish18k,cross,density] [--duration 30] [--nodes 3] [--out DIR]
#   loadtest/cluster.sh --quick          # smoke check: 1 run, 5 s of sends, two density steps (~2 min)
#   --quiet-wait S: before each run wait up to S s for a second with the machine <= 15 % busy (a shared
#   machine: other people's builds move latency percentiles most); each run's log and line carry loadavg.
#
# Scenarios (names for --only; `local` is extra, not in the default set):
#   publish18k  one publish to 18k streams: one gateway vs 18k spread over --nodes (publish via node 0);
#               200 probe sends/s to random tokens meanwhile (cluster: through a node not holding the token)
#   cross       2k sends/s for --duration s to 1k streams: local sends on one gateway vs sends through a
#               node that does not hold the token (--via other) on --nodes; CPU of all gateways + Redis
#   density     memory per idle stream (Pss slope 1k -> 18k): REDIS_URL unset vs set (--cluster 1)
#   local       as cross's cluster side, but each send goes to the node holding the token (--via holder):
#               what REDIS_URL costs a send that stays local (compared with cross's single side)
# Pinning as the single-node figures (BENCHMARKS.md §1): every gateway (WORKER_THREADS=1) and
# redis-server on CPU 0, sse-load on CPU 1. GATEWAY_COMMIT names the binary's commit in machine.txt
# (default: this checkout's HEAD). Every sse-load run is bounded (its own deadlines) and
# wrapped in `timeout`; sse-load starts and stops Redis and the gateways itself. Needs:
# cargo build --release -p sse-gateway -p sse-load, and /usr/bin/redis-server (Debian redis-server).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=3
ONLY="publish18k,cross,density"
DURATION=30
NODES=3
QUICK=0
QUIET_WAIT=0
QUIET_BUSY=15
OUT=${OUT:-/tmp/sse-cluster.$$}
. "$ROOT/loadtest/bench-lib.sh"
REDIS_BIN=${REDIS_BIN:-/usr/bin/redis-server}
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --quick) QUICK=1; RUNS=1; DURATION=5; shift ;;
    --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--only publish18k,cross,density,local] [--duration S] [--nodes N] [--out DIR] [--quick] [--quiet-wait S]" >&2; exit 2 ;;
  esac
done
[ -x "$REDIS_BIN" ] || { echo "$REDIS_BIN missing: apt-get install redis-server" >&2; exit 2; }
[ -x "$GATEWAY_BIN" ] && [ -x "$LOAD" ] || { echo "build first: cargo build --release -p sse-gateway -p sse-load" >&2; exit 2; }
mkdir -p "$OUT"
if [ "$QUICK" = 1 ]; then
  STEPS=1000,10000; SETTLE=1; ROUNDS=3
else
  STEPS=1000,5000,10000,18000; SETTLE=3; ROUNDS=5
fi
machine_info "redis $("$REDIS_BIN" --version)" \
  "args runs=$RUNS only=$ONLY duration=$DURATION nodes=$NODES quick=$QUICK quiet_wait=$QUIET_WAIT"
RUN_ARGS=(--redis-bin "$REDIS_BIN")

UNI="unicast -n 1000 -c 8 --rate 2000 --duration $DURATION"
PUB="broadcast -n 18000 --publish --channel all --rounds $ROUNDS --interval-ms 500 --round-timeout 10 --probe-rate 200"
for n in $(seq "$RUNS"); do
  if want publish18k; then
    run publish18k single "$n" -- $PUB
    run publish18k cluster "$n" -- $PUB --cluster "$NODES" --via other
  fi
  if want cross; then
    run cross single "$n" -- $UNI
    run cross cluster "$n" -- $UNI --cluster "$NODES" --via other
  fi
  if want local; then   # its single-node side is cross's
    run local cluster "$n" -- $UNI --cluster "$NODES" --via holder
  fi
  if want density; then
    run density single "$n" -- density --steps "$STEPS" --settle "$SETTLE"
    run density cluster "$n" -- density --steps "$STEPS" --settle "$SETTLE" --cluster 1
  fi
done
echo "logs and SUMMARY lines in $OUT; table: loadtest/cluster-table.py $OUT"
