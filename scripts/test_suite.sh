#!/usr/bin/env bash
# test_suite.sh PYTEST_COMMAND...: make test's build, ctest and pytest phases, on both cores.
#
# Two jobs side by side. In the foreground, pytest runs every test outside tests/cpp. In the
# background, at a lower priority (all three), the C++ builds, their ctest, then a second pytest process for
# tests/cpp (whose tests run the built programs). Why: pytest keeps about one of the machine's two
# cores busy (cpu 472 s in 479 s of pytest in a clean-clone CI of cc62d5b), and the builds and ctest
# took 241 s of the other; the C++ tests (95 s) ran after everything else in the same process,
# while the second core sat idle. They now take that core once it is free.
#
# The two pytest processes share the session fixtures' exports (the demo export, the bank, the
# family matrix): TRANSMITER_TEST_SHARED names the directory where whichever process needs one
# first makes it and the other waits for it (tests/conftest.py: made_once). It is new for each run
# and removed when every test passed (kept, and named, otherwise).
#
# Environment (from the Makefile): MAKE, CPP_BUILD_TARGETS, CPP_CTEST_TARGETS. Output of the
# background job: build/cpp-builds.log (the builds and ctest) and build/cpp-tests.log (its pytest),
# both printed at the end. Exit status: the first failure of the Python tests, the builds and
# ctest, the C++ tests, in that order.
set -uo pipefail
: "${MAKE:=make}"
mkdir -p build
builds_log=build/cpp-builds.log
tests_log=build/cpp-tests.log
rm -f "$tests_log"  # a log of an earlier run must not pass for this one's
shared=$(mktemp -d --tmpdir transmiter-tests.XXXXXX)
status_dir=$(mktemp -d --tmpdir transmiter-cpp-job.XXXXXX)
export TRANSMITER_TEST_SHARED=$shared
# Idle OpenMP threads (torch's intra-op pool) sleep instead of spinning: with two processes on two
# cores, a spinning thread of one burns the core the other is waiting for. Measured on the clean
# clone's CI: the first pytest process's CPU time 381 s -> 354 s, its wall time 416 s -> 401 s.
export OMP_WAIT_POLICY=PASSIVE
# the background job in a process group of its own (job control on for this one job), so that an
# interrupted make test stops it too
set -m
(
    if nice -n 10 bash scripts/phase.sh "c++ builds (beside pytest)" "$MAKE" --no-print-directory $CPP_BUILD_TARGETS &&
        nice -n 10 bash scripts/phase.sh "ctest (beside pytest)" "$MAKE" --no-print-directory $CPP_CTEST_TARGETS
    then
        echo 0 > "$status_dir/built"
        nice -n 10 bash scripts/phase.sh "pytest tests/cpp (beside pytest)" "$@" tests/cpp > "$tests_log" 2>&1
        echo $? > "$status_dir/tested"
    else
        echo $? > "$status_dir/built"
    fi
) > "$builds_log" 2>&1 &
job=$!
set +m
trap 'kill -- -"$job" 2>/dev/null; rm -rf "$shared" "$status_dir"; exit 130' INT TERM
start=$(date +%s)
bash scripts/phase.sh "pytest (without tests/cpp)" "$@" --ignore=tests/cpp
tests=$?
wait "$job"
end=$(date +%s)
built=$(cat "$status_dir/built" 2>/dev/null || echo "unknown (no status)")
cpp_tests=$(cat "$status_dir/tested" 2>/dev/null || echo "not run")
grep '^phase ' "$builds_log"
if [ -f "$tests_log" ]; then
    echo "== tests/cpp (their own pytest process, after the builds; $tests_log):"
    cat "$tests_log"
fi
# the tests' share of the run: from the first pytest process's start to the last one's end
line="phase pytest (both processes, start to end): $((end - start)) s"
echo "$line"
[ -n "${PHASE_LOG:-}" ] && echo "$line" >> "$PHASE_LOG"
rm -rf "$status_dir"
if [ "$built" != 0 ]; then
    echo "== the C++ builds or their ctest failed (exit $built), so tests/cpp did not run; $builds_log:"
    cat "$builds_log"
fi
for status in "$tests" "$built" "$cpp_tests"; do
    if [ "$status" != 0 ]; then
        echo "== the tests' shared fixtures are kept in $shared"
        [ "$status" -eq "$status" ] 2>/dev/null && exit "$status"
        exit 1
    fi
done
rm -rf "$shared"
exit 0
