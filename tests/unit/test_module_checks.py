"""The module checks' own tools (tests/module_checks.py): the fast closeness test accepts and
rejects what ``torch.testing.assert_close`` does, and the tall-matrix path of ``top_right`` gives
the SVD's right singular space."""

from __future__ import annotations

import pytest
import torch

from tests.module_checks import assert_close, min_cosine, top_right


def _torch_accepts(a, b, rtol, atol) -> bool:
    try:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        return True
    except AssertionError:
        return False


def test_assert_close_accepts_and_rejects_what_torch_does():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(300, 7, generator=g, dtype=torch.float64)
    rtol, atol = 1e-5, 1e-6
    edge = (atol + rtol * b.abs())  # just inside the bound everywhere, and just past it at one entry
    cases = {"equal": b.clone(), "inside": b + 0.99 * edge, "past_bound": b.clone(), "nan": b.clone(),
             "shape": b[:-1].clone(), "dtype": b.float()}
    cases["past_bound"][17, 3] += 1.01 * edge[17, 3]
    cases["nan"][5, 5] = float("nan")
    for name, a in cases.items():
        want = _torch_accepts(a, b, rtol, atol)
        assert want == (name in ("equal", "inside")), name
        if want:
            assert_close(a, b, rtol=rtol, atol=atol, msg=name)
        else:
            with pytest.raises(AssertionError):
                assert_close(a, b, rtol=rtol, atol=atol, msg=name)


def test_top_right_of_a_tall_matrix_is_the_svds_right_singular_space():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(4000, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    assert min_cosine(top_right(M, 4), Vh[:4].T) > 1 - 1e-12
    assert min_cosine(top_right(M[:20], 4), torch.linalg.svd(M[:20], full_matrices=False)[2][:4].T) > 1 - 1e-12
