#!/usr/bin/env bash
# Creates .venv, then installs a llama.cpp wheel that runs on this CPU and Chorus with
# its pinned dependencies (tools/llama_wheel: build flavours, cache, smoke check).
#
# llama-cpp-python has no wheel on PyPI for this platform and compiles from source
# (4-15 minutes on 2 cores), so the built wheel is cached outside the checkout, keyed
# by its version, build flags and the instruction sets it was compiled for
# (CHORUS_WHEEL_CACHE, default ~/.cache/chorus/wheels), and every build or cache hit
# is smoke-checked before the services get it. CHORUS_LLAMA_BUILD=portable asks for
# the AVX2 build that runs on any x86-64 CPU. torch==2.13.0 is pinned: pip takes the
# CPU wheel from the local disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m tools.llama_wheel setup
echo "setup: .venv ready" >&2
