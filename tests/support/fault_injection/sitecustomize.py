"""Forces a bad start-up calibration on one token server of a stack (issue 22's busy
start), for tests/system/test_capacity_stack.py: on PYTHONPATH with CHORUS_TEST_BUSY_CALIBRATION
naming a file that does not exist yet, the first token server to calibrate creates it
and measures every step 0.5 s slower than it ran, as a start beside three busy
neighbours did. Fake step times: nothing sleeps, and the real steps are untouched.

Only the engine module is patched, after it loads: importing it here would load
llama.cpp before the entry point sets OMP_WAIT_POLICY."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

CLAIM = os.environ.get("CHORUS_TEST_BUSY_CALIBRATION")
TARGET = "services.token_server.engine"
EXTRA_S = 0.5


class _BusyTime:
    """`time` whose perf_counter runs EXTRA_S fast on every read."""

    def __init__(self) -> None:
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return time.perf_counter() + EXTRA_S * self.reads

    def __getattr__(self, name):
        return getattr(time, name)


def _claimed() -> bool:
    """True in the first process to get here; it writes its pid, so that the test knows
    which server it is."""
    try:
        fd = os.open(CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as claim:
        claim.write(str(os.getpid()))
    return True


def _patch(module) -> None:
    original = module.Engine.calibrate

    def calibrate(self, *args, **kwargs):
        if not _claimed():
            return original(self, *args, **kwargs)
        real = module.time
        module.time = _BusyTime()
        try:
            return original(self, *args, **kwargs)
        finally:
            module.time = real

    module.Engine.calibrate = calibrate


class _PatchOnLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if CLAIM:
    sys.meta_path.insert(0, _PatchOnLoad())
