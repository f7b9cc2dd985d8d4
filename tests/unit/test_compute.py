"""The thread policy of the heavy linear algebra: restored on exit (also on exceptions), nesting keeps the outer one."""

from __future__ import annotations

import pytest
import torch

from subspace_sweep import compute


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


def test_policy_runs_small_ops_single_threaded_and_gemms_on_the_callers_threads(two_threads):
    with compute.policy():
        assert torch.get_num_threads() == 1
        with compute.gemm_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with compute.policy():  # nested: the outer policy (and its GEMM thread count) stands
            with compute.gemm_threads():
                assert torch.get_num_threads() == 2
        assert compute.run_jobs({("a", 1): lambda: 3, "b": lambda: 4}) == {("a", 1): 3, "b": 4}
    assert torch.get_num_threads() == 2
    with compute.gemm_threads():  # outside a policy: a no-op
        assert torch.get_num_threads() == 2


def test_policy_is_restored_when_a_job_raises(two_threads):
    def boom():
        raise RuntimeError("job failed")

    with pytest.raises(RuntimeError, match="job failed"), compute.policy():
        compute.run_jobs({"x": boom})
    assert torch.get_num_threads() == 2
    assert compute._ACTIVE == []
