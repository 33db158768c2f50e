"""How many CPUs this process may really use, and how `chorus serve` divides them.

`os.cpu_count()` counts the host's CPUs, not this process's: in a Kubernetes pod with
a CPU limit of 2 on a 64-core node it says 64, and a llama.cpp or torch pool of 64
threads on a 2-CPU quota spends most of its time throttled. The budget here is the
smaller of the CPUs in this process's affinity mask and its cgroup CPU quota (v2
`cpu.max`, or v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), read once at start.

Each service sizes its compute threads from its own budget when it runs alone (one
container, one budget). Processes that share a machine must not each take all of it:
a token server and a codec worker on the same 2 cores each taking 2 threads ran the
backbone at 0.85 CPU s per audio second, against 0.20 with one llama thread. So
`chorus serve` splits its own budget between the processes it starts and passes each
its share explicitly (`split_for_stack`). Processes started one by one (README's
per-service commands, two token servers and two codec workers on one host) each see
the whole budget: a service whose thread count was not given says so at start
(`shared_cores_notice`), and names the flag that divides the cores.

Oversubscribed pools must degrade, not collapse. llama.cpp (built with OpenMP) and
torch both run GNU OpenMP, whose idle threads spin (OMP_WAIT_POLICY unset: ~300k
spins) before sleeping; four processes spinning on two cores starved each other to
0.01-0.08 audio s/s (issue 22). The entry points set OMP_WAIT_POLICY=PASSIVE before
either library starts its runtime (`sleep_idle_threads`), unless the operator set it.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """CPUs this process may use: `cpus` (fractional when a quota says so) and where it came from."""

    cpus: float
    affinity: int
    quota: float | None  # None: no cgroup limit found

    @property
    def threads(self) -> int:
        """Compute threads that fit the budget: whole CPUs, at least one."""
        return max(1, math.floor(self.cpus + 1e-9))


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_cgroup_dirs(proc_cgroup: Path, root: Path) -> list[Path]:
    """This process's cgroup folders (v2 unified, and v1 cpu controllers), innermost first."""
    dirs = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":  # v2: 0::/path
            base = root
        elif "cpu" in controllers.split(","):
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"
        else:
            continue
        # A container often sees its own cgroup mounted at the root: try the path,
        # then each parent, then the root itself.
        candidate = base / relative
        while True:
            dirs.append(candidate)
            if candidate == base:
                break
            candidate = candidate.parent
    return dirs


def _quota_of(folder: Path) -> float | None:
    cpu_max = folder / "cpu.max"
    if cpu_max.is_file():
        try:
            quota, period = cpu_max.read_text().split()[:2]
        except (OSError, ValueError):
            return None
        return None if quota == "max" else int(quota) / int(period)
    quota_file, period_file = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
    if quota_file.is_file() and period_file.is_file():
        try:
            quota, period = int(quota_file.read_text()), int(period_file.read_text())
        except (OSError, ValueError):
            return None
        return None if quota <= 0 else quota / period
    return None


def cgroup_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota among this process's cgroup and its ancestors, in CPUs."""
    quotas = [q for d in _own_cgroup_dirs(proc_cgroup, root) if (q := _quota_of(d)) is not None]
    return min(quotas) if quotas else None


def cpu_budget(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> CpuBudget:
    affinity = _affinity()
    quota = cgroup_quota(proc_cgroup, root)
    cpus = float(affinity) if quota is None else min(float(affinity), quota)
    return CpuBudget(cpus=max(cpus, 0.01), affinity=affinity, quota=quota)


@dataclass(frozen=True)
class StackThreads:
    """Compute threads of each process of a local stack."""

    llama: int  # per token server
    torch: int  # per codec worker


def split_for_stack(budget: CpuBudget, token_servers: int = 1, codec_workers: int = 1) -> StackThreads:
    """Divides a machine between the token servers and codec workers of one stack.

    The backbone and the decoder each get their own cores rather than sharing all of
    them: measured on 2 cores (benchmarks/ceiling.py, docs/benchmarks.md), one llama
    thread beside one torch thread beats every split where the two pools overlap,
    and the asyncio loops, the gateway and the relays fit in what the two compute
    threads leave idle. Larger machines give the backbone the larger half.
    """
    cpus = budget.threads
    processes = token_servers + codec_workers
    if cpus <= processes:
        return StackThreads(llama=1, torch=1)
    llama_share = math.ceil(cpus / 2)
    torch_share = cpus - llama_share
    return StackThreads(
        llama=max(1, llama_share // token_servers),
        torch=max(1, torch_share // codec_workers),
    )


def sleep_idle_threads(environ: MutableMapping[str, str] = os.environ) -> None:
    """OpenMP threads sleep when idle rather than spin (OMP_WAIT_POLICY=PASSIVE), unless
    the environment already says otherwise. Effective only before llama.cpp or torch
    first loads its OpenMP runtime, so the entry points call it before importing them."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def shared_cores_notice(threads: int, flag: str, env_name: str) -> str:
    """The start-up line of a service that sized its compute threads from the whole
    budget, because neither `flag` nor `env_name` was given."""
    return (
        f"{threads} compute threads: every CPU this process may use, as {flag} was not given. "
        f"Processes started separately on one host each take them all and slow each other down; "
        f"beside other Chorus services on these cores, divide them with {flag} (or {env_name}), "
        "as `chorus serve` does"
    )
