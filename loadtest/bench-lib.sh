# Shared by the side-by-side benchmark scripts (compare.sh, cluster.sh, history.sh); sourced after
# they set ROOT. Defines TARGET_DIR, the binaries' and CPUs' defaults, `want` and, for the scripts
# that wait for a quiet machine and run only sse-load, busy_pct, quiet, machine_info and run.

# Cargo's target directory, found as cargo finds it (CARGO_TARGET_DIR, else build.target-dir or target/).
TARGET_DIR=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}
GATEWAY_BIN=${GATEWAY_BIN:-$TARGET_DIR/release/sse-gateway}
LOAD=${LOAD:-$TARGET_DIR/release/sse-load}
# Pinning as BENCHMARKS.md §1: the gateway (or Redis) on CPU 0, sse-load on CPU 1.
SERVER_CPU=0
LOAD_CPU=1

# want NAME: whether --only lists NAME.
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# busy_pct: share of both CPUs busy over the next second (/proc/stat), all processes.
busy_pct() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 - 100 * idle / total : 0 ))
}

# quiet: with --quiet-wait S, wait up to S s for a second in which the machine is at most
# QUIET_BUSY % busy (other people's builds on a shared machine), and say what was found.
quiet() {
  [ "$QUIET_WAIT" -gt 0 ] || return 0
  local t0=$SECONDS b
  while :; do
    b=$(busy_pct)
    [ "$b" -le "$QUIET_BUSY" ] && { echo "   (machine ${b}% busy after $((SECONDS - t0)) s of waiting)"; return 0; }
    [ $((SECONDS - t0)) -ge "$QUIET_WAIT" ] && { echo "   (machine still ${b}% busy after ${QUIET_WAIT} s: running anyway)"; return 0; }
    sleep 2
  done
}

# machine_info LINE...: the machine, the gateway binary and the given lines, into $OUT/machine.txt
# and on stdout.
machine_info() {
  {
    echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc $(nproc)"
    echo "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel $(uname -r)"
    echo "gateway $GATEWAY_BIN (built from ${GATEWAY_COMMIT:-$(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo '?')})"
    printf '%s\n' "$@"
  } > "$OUT/machine.txt"
  cat "$OUT/machine.txt"
}

# run NAME SIDE N -- sse-load args...: one run after a quiet second, with the gateway pinned and on one
# worker, its output in $OUT/NAME.SIDE.N.log and its SUMMARY (with the load average before it) in
# $OUT/NAME.SIDE.summaries. RUN_ARGS (an array) adds sse-load arguments to every run.
RUN_ARGS=()
run() {
  local name=$1 side=$2 n=$3; shift 4
  local log="$OUT/$name.$side.$n.log"
  quiet
  local t0=$SECONDS load0
  load0=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "loadavg before: $load0" > "$log"
  timeout 600 "$LOAD" "$@" --gateway-bin "$GATEWAY_BIN" "${RUN_ARGS[@]}" \
    --server-cpu "$SERVER_CPU" --load-cpu "$LOAD_CPU" --gateway-env WORKER_THREADS=1 >> "$log" 2>&1 || true
  echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$log"
  echo "== $name $side run $n ($((SECONDS - t0)) s, loadavg $load0 -> $(cut -d' ' -f1-3 /proc/loadavg)): $(grep -E '^RESULT' "$log" || echo 'no RESULT line')"
  grep -E '^SUMMARY' "$log" | sed "s/^SUMMARY {/SUMMARY {\"loadavg\":\"$load0\",/" >> "$OUT/$name.$side.summaries" || true
}
