"""Builds, caches and checks the llama.cpp wheel that the token server runs on.

llama-cpp-python has no wheel on PyPI for this platform and compiles from source, so
the wheel is built once and cached. A native build is tuned to the CPU it was built
on and can die with SIGILL anywhere else, so the cache is keyed by what the build
depends on (version, build flags, the compiler's instruction-set macros), every
build or cache hit is smoke-checked in a subprocess, and a wheel whose check dies by
a signal is set aside for good and replaced by the portable build.

Standard library only: setup runs this before the project's dependencies exist.
"""
