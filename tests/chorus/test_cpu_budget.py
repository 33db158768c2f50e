"""The CPU budget (chorus/realtime/cpu_budget.py) on fake cgroup trees: what a process
in a pod with a CPU limit may really use, and how `chorus serve` divides a machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from chorus.realtime.cpu_budget import CpuBudget, cgroup_quota, cpu_budget, shared_cores_notice, split_for_stack


def _cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount under tmp_path/fs with `files` (relative path -> text), and a
    /proc/self/cgroup naming `own`."""
    root = tmp_path / "fs"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = tmp_path / "cgroup"
    proc.write_text(own)
    return proc, root


def test_a_v2_quota_is_read_in_cpus(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/kubepods/pod/c1\n", {"kubepods/pod/c1/cpu.max": "150000 100000\n"})
    assert cgroup_quota(proc, root) == 1.5


def test_no_limit_is_no_quota(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/c1\n", {"c1/cpu.max": "max 100000\n"})
    assert cgroup_quota(proc, root) is None


def test_the_tightest_ancestor_wins(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/pod/c1\n", {"pod/cpu.max": "100000 100000\n", "pod/c1/cpu.max": "400000 100000\n"})
    assert cgroup_quota(proc, root) == 1.0


def test_a_container_that_sees_its_own_cgroup_at_the_root(tmp_path):
    # /proc/self/cgroup names a path that does not exist inside the container's mount.
    proc, root = _cgroup(tmp_path, "0::/kubepods/pod/c1\n", {"cpu.max": "200000 100000\n"})
    assert cgroup_quota(proc, root) == 2.0


def test_v1_cfs_quota(tmp_path):
    proc, root = _cgroup(tmp_path, "4:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_quota(proc, root) == 0.5


def test_v1_without_a_limit(tmp_path):
    proc, root = _cgroup(tmp_path, "4:cpu:/docker/abc\n", {
        "cpu/docker/abc/cpu.cfs_quota_us": "-1\n",
        "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_quota(proc, root) is None


def test_unreadable_cgroup_files_are_no_quota(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/c1\n", {"c1/cpu.max": "garbage\n"})
    assert cgroup_quota(proc, root) is None
    assert cgroup_quota(tmp_path / "missing", root) is None


def test_the_budget_is_the_smaller_of_affinity_and_quota(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/c1\n", {"c1/cpu.max": "50000 100000\n"})
    budget = cpu_budget(proc, root)
    assert budget.quota == 0.5 and budget.cpus == 0.5
    assert budget.threads == 1  # at least one thread, however small the quota
    unlimited = cpu_budget(tmp_path / "missing", root)
    assert unlimited.quota is None and unlimited.cpus == unlimited.affinity


@pytest.mark.parametrize(
    "cpus, token_servers, codec_workers, llama, torch",
    [
        (1, 1, 1, 1, 1),  # fewer CPUs than processes: one thread each, never zero
        (2, 1, 1, 1, 1),  # measured best on 2 cores: one llama thread beside one torch thread
        (3, 1, 1, 2, 1),  # the backbone takes the larger half
        (8, 1, 1, 4, 4),
        (8, 2, 2, 2, 2),  # each process of a kind gets its share of the kind's half
        (16, 1, 3, 8, 2),
    ],
)
def test_a_stack_divides_its_machine_and_never_oversubscribes(cpus, token_servers, codec_workers, llama, torch):
    share = split_for_stack(CpuBudget(cpus=float(cpus), affinity=cpus, quota=None), token_servers, codec_workers)
    assert (share.llama, share.torch) == (llama, torch)
    if cpus > token_servers + codec_workers:
        assert share.llama * token_servers + share.torch * codec_workers <= cpus


def test_a_fractional_quota_counts_whole_cpus():
    assert CpuBudget(cpus=2.9, affinity=4, quota=2.9).threads == 2


def test_the_notice_names_the_flag_and_variable_that_divide_the_cores():
    notice = shared_cores_notice(4, "--llama-threads", "CHORUS_LLAMA_THREADS")
    assert notice.startswith("4 compute threads")
    assert "--llama-threads" in notice and "CHORUS_LLAMA_THREADS" in notice
