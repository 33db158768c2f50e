#!/usr/bin/env bash
# Installs (cached after the first run) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# Tests share one set of demo models with the demo command instead of rebuilding them.
export CHORUS_TEST_MODELS=${CHORUS_TEST_MODELS:-$PWD/models/demo}
exec python -m pytest -q "$@"
