#!/usr/bin/env bash
# Creates .venv and installs Chorus with its pinned dependencies.
#
# llama-cpp-python has no wheel on PyPI for this platform and compiles from source
# (10-15 minutes on 2 cores), so the built wheel is kept in a cache outside the
# checkout and reused by every later run, fresh clones included. torch==2.13.0 is
# pinned: pip takes the CPU wheel from the local disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${CHORUS_WHEEL_CACHE:-$HOME/.cache/chorus/wheels}
LLAMA=llama-cpp-python==0.3.36

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# Skip the install when nothing it depends on changed since the last one.
stamp=.venv/.chorus-install-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
  echo "setup: building $LLAMA once (10-15 min on 2 cores); cached in $WHEELS" >&2
  python -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "$LLAMA"
fi
python -m pip install --quiet --upgrade pip >/dev/null
python -m pip install --quiet --find-links "$WHEELS" -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: .venv ready" >&2
