#!/usr/bin/env bash
# Installs, builds the demo models, starts the codec worker, token server and gateway
# as separate processes, synthesizes a sentence to out/hello.wav and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec chorus serve --models models/demo --say "${1:-Hello from Chorus, streaming speech as it is generated.}" -o out/hello.wav
