#!/usr/bin/env bash
# test_suite.sh PYTEST_COMMAND...: make test's build, ctest and pytest phases, with the C++ builds
# and their ctest beside pytest instead of before it.
#
# Why: pytest keeps about one of the machine's two cores busy on average (user time 17 min in an
# 18.7-minute run on the 2-core machine), and the C++ builds and ctest took 360 s on their own
# before it. Here they run in the background at a lower priority, their output in
# build/cpp-builds.log; pytest orders tests/cpp last (tests/conftest.py), and the C++ builds'
# fixtures wait for this job's status file before they look for a binary (tests/cpp/cpp_builds.py):
# TRANSMITER_CPP_BUILDS_STATUS names the file (the job's exit status, written when it ends),
# TRANSMITER_CPP_BUILDS_PID the job (gone without a status: it was killed).
#
# Environment (from the Makefile): MAKE, CPP_BUILD_TARGETS, CPP_CTEST_TARGETS. Exit status: pytest's
# when it failed, else the builds' (a failed build fails make test even when no test ran on it).
set -uo pipefail
: "${MAKE:=make}"
mkdir -p build
log=build/cpp-builds.log
status_file=$(mktemp --tmpdir transmiter-cpp-builds.XXXXXX)
rm -f "$status_file"
# the builds in a process group of their own (job control on for this one job), so that an
# interrupted make test stops them too
set -m
(
    nice -n 10 bash scripts/phase.sh "c++ builds (beside pytest)" "$MAKE" --no-print-directory $CPP_BUILD_TARGETS &&
        nice -n 10 bash scripts/phase.sh "ctest (beside pytest)" "$MAKE" --no-print-directory $CPP_CTEST_TARGETS
    echo $? > "$status_file.tmp" && mv "$status_file.tmp" "$status_file"
) > "$log" 2>&1 &
builds=$!
set +m
trap 'kill -- -"$builds" 2>/dev/null; rm -f "$status_file"; exit 130' INT TERM
TRANSMITER_CPP_BUILDS_STATUS=$status_file TRANSMITER_CPP_BUILDS_PID=$builds bash scripts/phase.sh pytest "$@"
tests=$?
wait "$builds"
built=$(cat "$status_file" 2>/dev/null || echo "unknown (no status)")
rm -f "$status_file"
grep '^phase ' "$log"
if [ "$built" != 0 ]; then
    echo "== the C++ builds or their ctest failed (exit $built); $log:"
    cat "$log"
    [ "$tests" -ne 0 ] && exit "$tests"
    exit 1
fi
exit "$tests"
