"""The ``threads`` option: how many intra-op threads a command takes (the logic, not the speed)."""

import os
from pathlib import Path

import pytest
import torch

from perk.cli import UsageError
from perk.config import TrainConfig
from perk.runs import physical_cores, resolve_threads, set_threads


def _topology(root: Path, siblings: dict[int, str]) -> Path:
    for cpu, text in siblings.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(text + "\n")
    return root


def test_physical_cores_count_smt_siblings_once(tmp_path):
    # 4 cores with 2 hardware threads each: cpu i and cpu i + 4 share core i.
    root = _topology(tmp_path, {cpu: f"{cpu % 4},{cpu % 4 + 4}" for cpu in range(8)})
    assert physical_cores(set(range(8)), root) == 4
    assert physical_cores({0, 4}, root) == 1  # both threads of one core
    assert physical_cores({0, 1, 5}, root) == 2
    assert physical_cores({2}, root) == 1


def test_physical_cores_without_smt_or_sysfs(tmp_path):
    root = _topology(tmp_path, {0: "0", 1: "1"})
    assert physical_cores({0, 1}, root) == 2
    assert physical_cores({0, 1, 2}, tmp_path / "missing") == 3  # no topology: every CPU counts


def test_physical_cores_of_this_process_fit_its_affinity():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("requested", "processes", "cores", "want"),
    [(0, 1, 2, 2), (0, 2, 2, 1), (0, 4, 16, 4), (0, 3, 16, 5), (0, 8, 2, 1), (3, 1, 2, 3), (1, 4, 16, 1)],
)
def test_resolve_threads(requested, processes, cores, want):
    assert resolve_threads(requested, processes=processes, cores=cores) == want


def test_omp_num_threads_counts_for_one_process_only():
    assert resolve_threads(0, cores=16, omp_threads=3) == 3
    assert resolve_threads(0, processes=4, cores=16, omp_threads=1) == 4  # torchrun's own OMP_NUM_THREADS=1
    assert resolve_threads(2, cores=16, omp_threads=3) == 2


def test_resolve_threads_rejects_negative():
    with pytest.raises(UsageError, match="threads"):
        resolve_threads(-1, cores=2)
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=-1)


def test_set_threads_shares_cores_among_torchrun_processes(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(physical_cores() + 1))
        assert set_threads(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert set_threads(0) == physical_cores() == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as tests/conftest sets it for xdist workers
        assert set_threads(0) == 1
    finally:
        torch.set_num_threads(saved)
