"""Issue 7: bootstrap intervals, compare across runs, topic holdout, block-local labels."""

from __future__ import annotations

import dataclasses
import math
import shutil

import polars as pl
import pytest
import torch

from subspace_sweep import cli, scoring
from subspace_sweep.capture import capture_labels
from subspace_sweep.compare import compare_runs, kendall_tau, load_run
from subspace_sweep.delta import random_delta
from subspace_sweep.errors import InputError
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.report import GAIN_RESOLUTION
from subspace_sweep.sweep import SweepConfig, build_targets, holdout_rows
from subspace_sweep.toy import build_tiny_model
from tests.helpers_model import small_probes

# ---- bootstrap -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_prompts(seed):
    gen = torch.Generator().manual_seed(seed)
    population = 3.0 + torch.randn(4, 256, generator=gen, dtype=torch.float64).abs()
    widths = []
    for n in (8, 32, 128):
        values = population[:, :n]
        lo, hi = scoring.bootstrap_mean_ci(values, 2000, seed)
        point = values.mean(1)
        assert bool(((lo <= point) & (point <= hi)).all())
        widths.append(float((hi - lo).mean()))
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_is_seeded_and_nan_rows_stay_nan():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, math.nan, 2.0, 2.0]], dtype=torch.float64)
    a = scoring.bootstrap_mean_ci(values, 500, 7)
    b = scoring.bootstrap_mean_ci(values, 500, 7)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert math.isnan(float(a[0][1])) and math.isnan(float(a[1][1]))


def test_sweep_summary_intervals_contain_r_act(demo_run):
    outcome, out = demo_run
    s = pl.read_csv(out / "summary.tsv", separator="\t").filter(pl.col("R_act_lo").is_not_nan())
    assert s.height > 40
    assert (s["R_act_lo"] <= s["R_act"] + 1e-9).all() and (s["R_act"] <= s["R_act_hi"] + 1e-9).all()
    assert (s["joint_lo"] <= s["joint"] + 1e-9).all() and (s["joint"] <= s["joint_hi"] + 1e-9).all()


# ---- compare ---------------------------------------------------------------------------------


@pytest.fixture
def identical_runs(demo_run, tmp_path):
    _, out = demo_run
    paths = []
    for name in ("seed_a", "seed_b", "seed_c"):
        shutil.copytree(out, tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_compare_on_identical_runs_gives_tau_one_and_zero_iqr(identical_runs):
    cmp = compare_runs([load_run(p) for p in identical_runs])
    assert cmp.taus["kendall_tau"].to_list() == pytest.approx([1.0, 1.0, 1.0])
    iqr = cmp.per_candidate.select(pl.col("^.*_iqr$")).to_numpy()
    assert (iqr[iqr == iqr] == 0).all()
    assert cmp.angles["cos_mean"].to_numpy() == pytest.approx(1.0)
    top = set(load_run(identical_runs[0]).joint_order[:5])
    stable = {r["candidate"] for r in cmp.per_candidate.iter_rows(named=True) if r["stable"]}
    strong = {r["candidate"] for r in cmp.per_candidate.iter_rows(named=True) if r["z_w_combined_min"] > 2}
    assert stable == top & strong


def test_compare_cli_writes_a_folder(identical_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *map(str, identical_runs[:2]), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"compare_summary.tsv", "rank_stability.tsv", "oracle_angles.tsv",
                                               "compare_ranking.png", "compare_ranking.pdf"}


def test_compare_refuses_a_single_or_incomplete_run(identical_runs, tmp_path):
    with pytest.raises(InputError, match="at least 2"):
        compare_runs([load_run(identical_runs[0])])
    (identical_runs[1] / "summary.tsv").unlink()
    with pytest.raises(InputError, match="summary.tsv"):
        load_run(identical_runs[1])


def test_kendall_tau_of_a_reversed_ranking_is_minus_one():
    assert kendall_tau(list("abcd"), list("dcba")) == pytest.approx(-1.0)
    assert kendall_tau(list("abcd"), list("abcd")) == pytest.approx(1.0)


# ---- topic holdout -----------------------------------------------------------------------------


def test_holdout_keeps_exactly_the_eval_probes_of_claims_not_used_for_training():
    probes = load_probe_set()  # FIT = claims 0..15, EVAL = claims 16..31
    rows = holdout_rows(probes, 20)
    assert rows == list(range(4, 16))  # claims 20..31
    assert [probes.eval[j] for j in rows] == list(probes.prompts[20:])
    with pytest.raises(InputError, match="held-out"):
        holdout_rows(probes, 31)


def test_holdout_target_is_built_from_exactly_those_rows():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randn(2, 16, 12, generator=gen)
    delta_free = {}  # no weight targets needed for the activation targets
    t = build_targets(labels, delta_free, [1], holdout=list(range(4, 16)))[1]
    expected = scoring.Target.from_rows("x", labels[1, 4:16])
    assert torch.allclose(t["act_holdout"].gram, expected.gram)
    assert not torch.allclose(t["act"].gram, expected.gram)


def test_sweep_reports_both_variants_with_holdout(demo_run):
    from subspace_sweep.demo import run_demo

    outcome = run_demo(SweepConfig(out=None, quiet=True, topic_holdout=20, n_boot=0))
    s = outcome.result.summary
    for col in ("R_act", "R_act_holdout", "z_act_holdout", "joint_holdout"):
        assert col in s.columns
    assert not s["R_act"].equals(s["R_act_holdout"])
    base = demo_run[0].result.summary
    assert s["R_act"].to_list() == pytest.approx(base["R_act"].to_list(), nan_ok=True)


# ---- block-local label ------------------------------------------------------------------------


def test_block_local_label_is_the_difference_of_consecutive_block_labels():
    model, tok = build_tiny_model(seed=0)
    delta = random_delta(model, [1, 2], rank=2, seed=0, scale=0.3)
    probes = small_probes()
    out = capture_labels(model, tok, delta, probes)
    local = capture_labels(model, tok, delta, probes, label="block_local")
    # a block's input is the previous block's output, so the local label telescopes
    torch.testing.assert_close(local.eval[1:], out.eval[1:] - out.eval[:-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(local.eval[0], out.eval[0])
    assert not torch.allclose(local.eval[2], out.eval[2])


def test_unknown_label_kind_is_an_input_error():
    with pytest.raises(InputError, match="label"):
        SweepConfig(label="residual").validate()
    assert dataclasses.replace(SweepConfig(), label="block_local").validate() is None


def test_several_deltas_share_one_a_side_and_compare(tiny_dir, tmp_path):
    """`run` with several deltas (e.g. LoRA seeds) builds the A-side once: the first run's
    manifest counts 3 A-side + 2 label passes, the others only their 2 label passes."""
    import json

    from subspace_sweep.delta import save_delta
    from subspace_sweep.model import load_model

    model, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    paths = []
    for seed in (0, 1):
        paths.append(save_delta(random_delta(model, [1, 2], rank=2, seed=seed), tmp_path / f"seed{seed}.safetensors"))
    out = tmp_path / "runs"
    argv = ["run", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--n-boot", "0"]
    for p in paths:
        argv += ["--delta", str(p)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed0", "seed1"]
    passes = [json.loads((out / n / "manifest.json").read_text())["forward_passes"] for n in ("seed0", "seed1")]
    assert passes == [11, 2]  # the A-side's 4 and the gradient bases' 5 are the first run's
    runs = [load_run(out / n) for n in ("seed0", "seed1")]
    a0 = runs[0].summary.filter(pl.col("side") == "A").sort("candidate")
    a1 = runs[1].summary.filter(pl.col("side") == "A").sort("candidate")
    assert a0["rank"].to_list() == a1["rank"].to_list()
    cmp = compare_runs(runs)
    assert cmp.taus.height == 1 and -1.0 <= cmp.taus["kendall_tau"][0] <= 1.0


# ---- compare: both ranking views (issue 35) ----------------------------------------------------


def _set_outlier_record(run, share: float | None, in_conclusion: bool = False) -> None:
    """The run's record of the outlier warning: every act/combined top-8 share in spectra.tsv set to
    ``share`` (None: those rows removed, as in a run written before the diagnostic), the warning's
    line in conclusion.md or not."""
    from subspace_sweep.compare import OUTLIER_WARNING_MARK

    spectra = pl.read_csv(run / "spectra.tsv", separator="\t", infer_schema_length=None)
    top8 = pl.col("target").is_in(["act_top8_coordinates", "combined_top8_coordinates"])
    spectra = spectra.filter(~top8) if share is None else spectra.with_columns(
        energy=pl.when(top8).then(pl.lit(share)).otherwise(pl.col("energy")))
    spectra.write_csv(run / "spectra.tsv", separator="\t")
    text = "\n".join(ln for ln in (run / "conclusion.md").read_text().splitlines() if OUTLIER_WARNING_MARK not in ln)
    if in_conclusion:
        text += f"\n- {OUTLIER_WARNING_MARK}: the top-8 coordinates hold more than 0.5 of ...\n"
    (run / "conclusion.md").write_text(text)


def _reverse_the_standardized_joint_order(run) -> list[str]:
    summary = pl.read_csv(run / "summary.tsv", separator="\t")
    n = summary.filter(pl.col("panel") == "joint").height
    summary = summary.with_columns(rank_in_panel_std=pl.when(pl.col("panel") == "joint")
                                   .then(n + 1 - pl.col("rank_in_panel_std")).otherwise(pl.col("rank_in_panel_std")))
    summary.write_csv(run / "summary.tsv", separator="\t")
    return summary.filter(pl.col("panel") == "joint").sort("rank_in_panel_std")["candidate"].to_list()


def test_the_outlier_warning_is_read_from_the_spectra_or_the_conclusion(identical_runs):
    from subspace_sweep.compare import outlier_warning

    run = identical_runs[0]
    _set_outlier_record(run, 0.5)
    assert outlier_warning(run) is False  # the warning fires above 0.5
    _set_outlier_record(run, 0.500001)
    assert outlier_warning(run) is True
    _set_outlier_record(run, 0.2, in_conclusion=True)  # the tsv's 6 digits may round a share to 0.5: the line decides
    assert outlier_warning(run) is True
    _set_outlier_record(run, None)
    assert outlier_warning(run) is None  # not recorded: not known
    _set_outlier_record(run, None, in_conclusion=True)
    assert outlier_warning(run) is True


@pytest.mark.parametrize("fired", [False, True])
def test_compare_reports_both_views_the_standardized_first_where_a_warning_fired(identical_runs, tmp_path, fired):
    """Issue 35: compare read `joint_gain` only. Run b's standardized joint ranking is run a's
    reversed: τ = 1 in the residual view, exactly −1 in the standardized one; each view has its
    stability table and headline columns; the standardized view comes first where a run's outlier
    warning fired (in run b only, here)."""
    a, b, c = identical_runs
    for run in identical_runs:
        _set_outlier_record(run, 0.2)
    if fired:
        _set_outlier_record(b, 0.9)
    reversed_order = _reverse_the_standardized_joint_order(b)
    runs = [load_run(p) for p in identical_runs]
    assert [r.outlier_warning for r in runs] == [False, fired, False]
    cmp = compare_runs(runs)
    assert cmp.views == (("standardized", "residual") if fired else ("residual", "standardized"))
    assert ("outlier-coordinate warning (SPEC §6 concern 14) fired in run(s) seed_b" in " ".join(cmp.notes)) == fired
    taus = {(r["run_a"], r["run_b"]): (r["kendall_tau"], r["kendall_tau_std"]) for r in cmp.taus.iter_rows(named=True)}
    assert taus[("seed_a", "seed_b")] == pytest.approx((1.0, -1.0))
    assert taus[("seed_a", "seed_c")] == pytest.approx((1.0, 1.0))
    std = cmp.per_candidate_std
    assert {"joint_gain_std_median", "gain_w_combined_std_iqr", "z_w_combined_std_min", "stable"} <= set(std.columns)
    medians = std["joint_gain_std_median"].to_list()  # rank-fair: gains within GAIN_RESOLUTION tie;
    scored = [m for m in medians if m == m]  # an empty candidate (NaN: grad_behaviour_family here) last
    assert medians[:len(scored)] == scored and all(x >= y - GAIN_RESOLUTION for x, y in zip(scored, scored[1:]))
    first = runs[0].order("standardized")[:5]
    assert set(first) != set(reversed_order[:5])  # the two runs' top-5 differ in this view ...
    in_top = {r["candidate"]: r["in_top5"] for r in std.iter_rows(named=True)}
    assert all(in_top[x] >= 2 for x in first)  # ... a and c share theirs
    h = {r["run"]: r for r in cmp.headline.iter_rows(named=True)}
    joint_b = runs[1].summary.filter((pl.col("panel") == "joint") & pl.col("axis_kind").is_in(["write", "mixed"]))
    assert h["seed_b"]["best_candidate_std"] == joint_b.sort("rank_in_panel_std")["candidate"][0]
    assert h["seed_a"]["best_candidate"] == h["seed_b"]["best_candidate"]  # the residual view is untouched
    assert [h[n]["outlier_warning"] for n in ("seed_a", "seed_b", "seed_c")] == [False, fired, False]
    out = tmp_path / "cmp"
    assert cli.main(["compare", *map(str, identical_runs), "--out", str(out)]) == 0
    assert {"compare_summary.tsv", "compare_summary_std.tsv", "compare_ranking_std.png", "compare.md"} <= {
        p.name for p in out.iterdir()}
    md = (out / "compare.md").read_text()
    std_at, res_at = md.index("## The standardized view"), md.index("## The residual view")
    assert (std_at < res_at) == fired
    assert pl.read_csv(out / "rank_stability.tsv", separator="\t")["kendall_tau_std"].to_list() == pytest.approx(
        [-1.0, 1.0, -1.0])


def test_compare_of_a_run_without_the_standardized_columns_says_so(identical_runs, tmp_path, capsys):
    """A run folder written before the standardized view: compared in the residual view, with a note."""
    old = identical_runs[0]
    summary = pl.read_csv(old / "summary.tsv", separator="\t")
    summary.drop([c for c in summary.columns if c.endswith("_std")]).write_csv(old / "summary.tsv", separator="\t")
    _set_outlier_record(old, None)
    _set_outlier_record(identical_runs[1], 0.9)
    runs = [load_run(p) for p in identical_runs[:2]]
    cmp = compare_runs(runs)
    assert cmp.views == ("residual",) and cmp.per_candidate_std is None
    assert "seed_a have no standardized columns" in cmp.notes[0] and "fired in run(s) seed_b" in cmp.notes[1]
    assert cmp.taus["kendall_tau_std"].to_list() == [None]
    assert cmp.headline["best_candidate_std"].to_list()[0] is None and cmp.headline["outlier_warning"].to_list() == [
        None, True]
    out = tmp_path / "cmp"
    assert cli.main(["compare", *map(str, identical_runs[:2]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "have no standardized columns" in printed and "stable candidates, residual view:" in printed
    assert "standardized view:" not in printed and not (out / "compare_summary_std.tsv").exists()
    assert "The standardized view is not compared" in (out / "compare.md").read_text()
