#!/usr/bin/env bash
# phase.sh NAME COMMAND...: run COMMAND, then print how long it took as "phase NAME: N s" (also
# appended to $PHASE_LOG when set, for .ci/run's summary). The command's exit status is kept.
set -uo pipefail
name=$1
shift
start=$(date +%s.%N)
"$@"
status=$?
seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
line="phase ${name}: ${seconds} s$([ "$status" -eq 0 ] || echo " (failed, exit ${status})")"
echo "$line"
[ -n "${PHASE_LOG:-}" ] && echo "$line" >> "$PHASE_LOG"
exit "$status"
