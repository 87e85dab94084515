# Sourced by the device-call scripts (kernel_candidates.sh, mosaic_candidates.sh): `step NAME SECONDS COMMAND...`
# runs COMMAND under its own time limit, so one that hangs or fails does not cost the others; its output goes to
# $OUT/NAME.txt, and the lines that matter (test summaries, errors, markdown table rows) are echoed; its status is
# COMMAND's (124 when it ran out of time).
step() {
  local name=$1 seconds=$2
  shift 2
  echo "=== $name (limit ${seconds} s)"
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  local status=$?
  echo "exit $status after $((SECONDS - start)) s"
  grep -E "passed|failed|error|Error|^\|" "$OUT/$name.txt" | tail -30
  return $status
}
