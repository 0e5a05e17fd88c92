# Shared by the side-by-side benchmark scripts (compare.sh, cluster.sh, history.sh); sourced after
# they set ROOT. Defines TARGET_DIR and, for the scripts that wait for a quiet machine, busy_pct and
# quiet (which read QUIET_WAIT and QUIET_BUSY).

# Cargo's target directory, found as cargo finds it (CARGO_TARGET_DIR, else build.target-dir or target/).
TARGET_DIR=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}

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
