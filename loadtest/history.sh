#!/usr/bin/env bash
# The load figures of channel history and Last-Event-ID resume (PROTOCOL §11), side by side with
# history off, alternating, --runs times; every run's log and SUMMARY line under --out.
# loadtest/history-table.py turns them into medians, ratios and verdicts (BENCHMARKS.md §10).
#
#   loadtest/history.sh [--runs 5] [--only publish18k,storm,memory] [--out DIR] [--quiet-wait S]
#   loadtest/history.sh --quick          # smoke check: 1 run, smaller counts (~2 min)
#
# Scenarios (names for --only; `storm-one` and `storm-race` are extra, not in the default set):
#   publish18k  one publish to 18k streams per round, 10 rounds: HISTORY_SIZE=0 vs HISTORY_SIZE=100;
#               gateway CPU per delivered frame (bound: history on <= 1.2x history off)
#   storm       10k streams, each in all 10 channels, see 10 events; all drop; 50 events are
#               published (5 per channel) while they are away; all reconnect within 1 s with their
#               Last-Event-ID (`resume`), against the same storm reconnecting without it
#               (`--without-id`, nothing to replay): time until all are live, lost/duplicated, CPU
#   storm-one   the storm with each stream in one channel (1k per channel, 50 events to each)
#   storm-race  the storm with an event published every 20 ms while the streams reconnect
#               (correctness: each must arrive once, by replay or live)
#   memory      one 1 KiB event to each of 100k channels through /internal/batch, no streams:
#               HISTORY_MAX_BYTES 16 MiB, 64 MiB (default) and 1 GiB (never reached: calibration),
#               64 MiB with 1238 B events (frames that fill mimalloc's 1280 B class exactly), and
#               64 MiB with HISTORY_TTL_SECONDS=5 then waiting for the expiry
# Pinning as BENCHMARKS.md §1: the gateway on CPU 0 with WORKER_THREADS=1, sse-load on CPU 1.
# Descriptors: 18k streams (publish18k) and 10k (storm) stay under sse-load's 19700 cap (hard
# limit 20000 less 300 reserved). Every sse-load run is bounded (its own deadlines) and wrapped in
# `timeout`; sse-load starts and stops the gateway itself. Loopback only.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=5
ONLY="publish18k,storm,memory"
QUICK=0
QUIET_WAIT=0
QUIET_BUSY=15
OUT=${OUT:-/tmp/sse-history.$$}
. "$ROOT/loadtest/bench-lib.sh"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --quick) QUICK=1; RUNS=1; shift ;;
    --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--only publish18k,storm,storm-one,storm-race,memory] [--out DIR] [--quick] [--quiet-wait S]" >&2; exit 2 ;;
  esac
done
[ -x "$GATEWAY_BIN" ] && [ -x "$LOAD" ] || { echo "build first: cargo build --release -p sse-gateway -p sse-load" >&2; exit 2; }
mkdir -p "$OUT"
if [ "$QUICK" = 1 ]; then
  PUB_N=5000; ROUNDS=3; STORM_N=2000; MEM_CHANNELS=20000
else
  PUB_N=18000; ROUNDS=10; STORM_N=10000; MEM_CHANNELS=100000
fi
machine_info "nofile $(ulimit -Hn) somaxconn $(cat /proc/sys/net/core/somaxconn)" \
  "args runs=$RUNS only=$ONLY quick=$QUICK quiet_wait=$QUIET_WAIT"

H=--gateway-env
PUB="broadcast -n $PUB_N --publish --channel all --rounds $ROUNDS --interval-ms 500 --round-timeout 10"
STORM="resume -n $STORM_N --channels 10 --before 10 --missed 50 --spread-ms 1000 --storm-timeout 60 $H HISTORY_SIZE=100"
MEM="history-memory --channels $MEM_CHANNELS --batch 1000 --samples 10 $H HISTORY_SIZE=100 $H MAX_SEND_BYTES=2097152"
for n in $(seq "$RUNS"); do
  if want publish18k; then
    run publish18k off "$n" -- $PUB $H HISTORY_SIZE=0
    run publish18k on "$n" -- $PUB $H HISTORY_SIZE=100
  fi
  if want storm; then
    run storm resume "$n" -- $STORM --join all
    run storm noid "$n" -- $STORM --join all --without-id
  fi
  if want storm-one; then
    run storm-one resume "$n" -- $STORM --join one
  fi
  if want storm-race; then
    run storm-race resume "$n" -- $STORM --join all --publish-during-ms 20
  fi
  if want memory; then
    run memory 16m "$n" -- $MEM --event-bytes 1024 $H HISTORY_MAX_BYTES=16777216
    run memory 64m "$n" -- $MEM --event-bytes 1024
    run memory 1g "$n" -- $MEM --event-bytes 1024 $H HISTORY_MAX_BYTES=1073741824
    run memory 64m-1238 "$n" -- $MEM --event-bytes 1238
    run memory expiry "$n" -- $MEM --event-bytes 1024 $H HISTORY_TTL_SECONDS=5 --expire-wait 30
  fi
done
echo "logs and SUMMARY lines in $OUT; table: loadtest/history-table.py $OUT"
