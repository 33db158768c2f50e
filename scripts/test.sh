#!/usr/bin/env bash
# Installs (cached after the first run) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# tests/test_prometheus.py scrapes the services with a real Prometheus: Debian's
# package, installed once where we may (CI runs as root on a fresh machine).
if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing Debian's prometheus for tests/test_prometheus.py" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
    >/dev/null || echo "test: could not install prometheus; tests/test_prometheus.py will be skipped" >&2
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# Tests share one set of demo models with the demo command instead of rebuilding them.
export CHORUS_TEST_MODELS=${CHORUS_TEST_MODELS:-$PWD/models/demo}
exec python -m pytest -q "$@"
