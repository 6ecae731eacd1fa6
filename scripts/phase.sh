#!/usr/bin/env bash
# phase.sh NAME COMMAND...: run COMMAND, then print how long it took as "phase NAME: N s (cpu M s)"
# (also appended to $PHASE_LOG when set, for .ci/run's summary): M is the user and system time of
# the command and the processes it waited for, so M / N is how many cores the phase kept busy. The
# command's exit status is kept.
set -uo pipefail
name=$1
shift
start=$(date +%s.%N)
"$@"
status=$?
seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
# bash's `times` (in this shell, not a pipeline's subshell, which has no children of its own): its
# second line is the children's user and system time, as 1m2.345s 0m0.678s
times_file=$(mktemp)
times > "$times_file"
cpu=$(tail -n 1 "$times_file" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); t += p[1] * 60 + p[2] } printf "%.0f", t }')
rm -f "$times_file"
line="phase ${name}: ${seconds} s (cpu ${cpu} s)$([ "$status" -eq 0 ] || echo " (failed, exit ${status})")"
echo "$line"
[ -n "${PHASE_LOG:-}" ] && echo "$line" >> "$PHASE_LOG"
exit "$status"
