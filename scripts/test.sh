#!/usr/bin/env bash
# Installs (cached after the first run) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# tests/system/test_prometheus.py scrapes the services with a real Prometheus: Debian's
# package, installed once where we may (CI runs as root on a fresh machine).
if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing Debian's prometheus for tests/system/test_prometheus.py" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
    >/dev/null || echo "test: could not install prometheus; tests/system/test_prometheus.py will be skipped" >&2
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# Tests share one set of demo models with the demo command instead of rebuilding them.
export CHORUS_TEST_MODELS=${CHORUS_TEST_MODELS:-$PWD/models/demo}
# Two phases (pyproject.toml's `serial` marker). First every test that does not judge
# real time, CHORUS_TEST_WORKERS at a time (default 2), each test file on one worker so
# that a module's stack starts once; then the tests that judge real time (deadlines,
# timeouts, stalls, capacity, CPU share), alone, as the whole suite once ran.
# --no-loadscope-reorder keeps tests/conftest.py's order (modules marked slow first)
# instead of pytest-xdist's largest-test-count-first, which left the longest file,
# one test, to run alone at the end.
workers=${CHORUS_TEST_WORKERS:-2}
set +e
python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder -m "not serial" "$@"
parallel=$?
python -m pytest -q -m serial "$@"
serial=$?
set -e
# 5 is "no test selected": a phase that a file or -k given to this script left empty.
for rc in "$parallel" "$serial"; do
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then exit "$rc"; fi
done
if [ "$parallel" = 5 ] && [ "$serial" = 5 ]; then exit 5; fi
