"""Adapter families (SPEC §10, issue 17): LoRA, DoRA, PiSSA-initialised LoRA, OFT and IA3 pairs
trained on the tiny model, diffed and swept; the cross-adapter headline of ``compare``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from subspace_sweep import cli
from subspace_sweep.delta import delta_from_peft
from subspace_sweep.lora_train import ADAPTER_FAMILIES, train_lora_pair
from subspace_sweep.model import load_model
from tests.helpers_model import effective_parameters

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def families(tiny_dir, tmp_path_factory):
    """family -> (pos, neg, delta path, run folder), every family trained, diffed and run once."""
    root = tmp_path_factory.mktemp("families")
    (root / "runs").mkdir()
    out = {}
    for family in ADAPTER_FAMILIES:
        pos, neg = train_lora_pair(tiny_dir, root / family, layers=(1, 2), steps=8, seed=0, num_threads=1,
                                   family=family)
        w = root / f"{family}.safetensors"
        assert cli.main(["delta", "--model", str(tiny_dir), "--adapter-pos", str(pos), "--adapter-neg", str(neg),
                         "--out", str(w)]) == 0
        run = root / "runs" / family
        assert cli.main(["run", "--model", str(tiny_dir), "--delta", str(w), "--out", str(run), "--quiet",
                         "--n-boot", "0"]) == 0
        out[family] = (pos, neg, w, run)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ADAPTER_FAMILIES)
def test_each_familys_delta_is_merged_pos_minus_merged_neg(tiny_dir, families, family):
    """Against every parameter as the UNMERGED adapters compute with it (their forward probed)."""
    pos, neg, _, run = families[family]
    base, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    eff = [effective_parameters(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(a)).eval(), base)
           for a in (pos, neg)]
    delta = delta_from_peft(tiny_dir, pos, neg)
    expected = {k: eff[0][k] - eff[1][k] for k in eff[0] if (eff[0][k] - eff[1][k]).abs().max() > 1e-6}
    assert set(delta) == set(expected) and delta, sorted(set(delta) ^ set(expected))[:5]
    for k, v in delta.items():
        torch.testing.assert_close(v, expected[k], atol=2e-5, rtol=1e-4, msg=k)
    assert (run / "summary.tsv").is_file()


@pytest.mark.slow
def test_the_cross_adapter_headline_has_one_row_per_adapter_and_is_the_same_in_two_processes(families, tmp_path):
    runs = [str(families[f][3]) for f in ADAPTER_FAMILIES]
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"cmp{hash_seed}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, "-m", "subspace_sweep.cli", "compare", *runs, "--out", str(out)],
                       env=env, check=True, capture_output=True, cwd=ROOT)
        outs.append(out)
    assert (outs[0] / "headline.tsv").read_bytes() == (outs[1] / "headline.tsv").read_bytes()
    h = pl.read_csv(outs[0] / "headline.tsv", separator="\t")
    assert h["run"].to_list() == list(ADAPTER_FAMILIES)
    assert h["best_joint_gain"].is_nan().sum() == 0
    assert set(h["scope_verdict"]) <= {"scope artifact", "real mismatch", "no scope artifact"}
    assert (outs[0] / "headline.png").is_file() and (outs[0] / "headline.pdf").is_file()
