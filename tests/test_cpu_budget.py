"""The CPU budget: a local grid's share of the cores or SLURM's allocation holds torch threads and workers."""

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.utils import cpu_budget, limit_threads
from pipeline.evaluation.run import cpu_layout


def test_budget_comes_from_sipat_cpus_then_slurm(monkeypatch):
    monkeypatch.delenv("SIPAT_CPUS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert cpu_budget() is None
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert cpu_budget() == 2
    monkeypatch.setenv("SIPAT_CPUS", "1")
    assert cpu_budget() == 1
    monkeypatch.setenv("SIPAT_CPUS", "two")
    with pytest.raises(ConfigError, match="SIPAT_CPUS='two'"):
        cpu_budget()


def test_limit_threads_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("SIPAT_CPUS", "1")
        assert limit_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("workers, threads, budget, want", [
    (2, 1, None, (2, 1)),      # nobody decided: params.yaml's layout
    (2, 1, 1, (1, 1)),         # SLURM -c 1 / one of two local runs on two cores: one process
    (2, 1, 2, (2, 1)),
    (2, 1, 8, (2, 4)),         # more cores than workers: threads fill them
    (4, None, 2, (2, 1)),
])
def test_evaluation_layout_never_exceeds_the_budget(workers, threads, budget, want):
    assert cpu_layout(workers, threads, budget) == want
