"""Studies end to end on the tiny model (issue 32): examples/study-tiny.toml (2 families × 2 seeds)
run with the local executor, through submitit's local cluster, and killed (SIGKILL) in the middle of
a job then resumed: the three aggregates are byte for byte the same. A changed spec is refused, a
job that cannot train is recorded while the others finish, bad specs exit 2 before any job.

The studies share one tiny model folder and one spec; the killed and the submitit ones start from
copies of the local study with one job removed, so each does one job's work."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import polars as pl
import pytest

from subspace_sweep import cli
from subspace_sweep.study import RECORD, load_spec, run_study
from tests.helpers_kill import Paused

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "study-tiny.toml"

pytest.importorskip("peft")


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model and the example spec beside it."""
    from subspace_sweep.toy import save_tiny_model

    root = tmp_path_factory.mktemp("study")
    save_tiny_model(root / "tiny-qwen3", seed=0)
    spec = root / "study.toml"
    shutil.copy(EXAMPLE, spec)
    return {"root": root, "spec": spec}


@pytest.fixture(scope="module")
def local_study(world):
    out = world["root"] / "local"
    assert cli.main(["study", str(world["spec"]), "--out", str(out), "--quiet"]) == 0
    return out


def test_the_tiny_study_runs_every_job_and_aggregates(local_study):
    jobs = sorted(p.parent.relative_to(local_study / "jobs").as_posix() for p in (local_study / "jobs").rglob(RECORD))
    assert jobs == ["tiny-qwen3/ia3/seed0", "tiny-qwen3/ia3/seed1", "tiny-qwen3/lora/seed0", "tiny-qwen3/lora/seed1"]
    for job in jobs:
        record = json.loads((local_study / "jobs" / job / RECORD).read_text())
        assert record["status"] == "done" and set(record["steps"]) == {"train", "delta", "run"}
        assert (local_study / "jobs" / job / "run" / "manifest.json").is_file()
    agg = local_study / "study"
    for name in ("per_job.tsv", "claims.tsv", "across_families.tsv", "winners.tsv", "kendall.tsv", "conclusion.md",
                 "forest.png", "forest.pdf", "heatmap.png", "heatmap.pdf", "manifest.json"):
        assert (agg / name).is_file(), name
    per_job = pl.read_csv(agg / "per_job.tsv", separator="\t")
    assert per_job["job"].to_list() == ["tiny-qwen3/lora/seed0", "tiny-qwen3/lora/seed1", "tiny-qwen3/ia3/seed0",
                                        "tiny-qwen3/ia3/seed1"]
    assert per_job["best_share"].is_nan().sum() == 0 and per_job["winner_kept"].is_nan().sum() == 0
    # the gradient bases' numbers (issue 34) are each job's own summary rows, read, not recomputed
    for r in per_job.iter_rows(named=True):
        summary = pl.read_csv(local_study / "jobs" / r["job"] / "run" / "summary.tsv", separator="\t")
        joint = summary.filter(pl.col("panel") == "joint")
        gain = dict(zip(joint["candidate"], joint["gain_w_combined"]))
        assert r["grad_gain_w"] == pytest.approx(gain["grad_behaviour"], abs=5e-7)
        assert r["grad_family_gain_w"] == pytest.approx(gain["grad_behaviour_family"], abs=5e-7)
        assert r["grad_family_minus_full"] == pytest.approx(r["grad_family_gain_w"] - r["grad_gain_w"], abs=2e-6)
    assert (agg / "gradients.tsv").is_file() and "## The gradient bases" in (agg / "conclusion.md").read_text()
    claims = pl.read_csv(agg / "claims.tsv", separator="\t")
    assert claims.height == 2 * 6 and set(claims["verdict"]) <= {"holds", "fails", "undecided"}
    # the A-side was built once (the first job) and loaded by the others
    manifests = [json.loads((local_study / "jobs" / j / "run" / "manifest.json").read_text())
                 for j in ["tiny-qwen3/lora/seed0", "tiny-qwen3/lora/seed1", "tiny-qwen3/ia3/seed0", "tiny-qwen3/ia3/seed1"]]
    assert [m["a_side_cache"]["status"] for m in manifests] == ["miss", "hit", "hit", "hit"]
    # the gradient bases once per training seed (its answer templates), whatever the family; the family
    # variant is each job's own (LoRA's from its init, IA3's from its scaling)
    grad = [m["gradient_bases"] for m in manifests]
    assert [g["cache"]["status"] for g in grad] == ["miss", "miss", "hit", "hit"]
    assert [g["forward_backward_passes"] for g in grad] == [5, 5, 0, 0]
    assert grad[0]["cache"]["key"] == grad[2]["cache"]["key"] != grad[1]["cache"]["key"] == grad[3]["cache"]["key"]
    assert [g["family_variant"].split(":")[0].split(" ")[0] for g in grad] == ["LoRA", "LoRA", "IA3", "IA3"]


def test_a_rerun_does_nothing_and_dry_run_lists_every_job_done(local_study, world, capsys):
    before = _tree(local_study / "study")
    outcome = run_study(world["spec"], local_study, progress=False)
    assert outcome.ran == [] and set(outcome.states.values()) == {"done"}
    assert _tree(local_study / "study") == before
    capsys.readouterr()
    assert cli.main(["study", str(world["spec"]), "--out", str(local_study), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "4 jobs, 0 to run" and all(line.endswith("done") for line in out[:-1])


def test_aggregate_only_runs_nothing_and_aggregates_the_finished_jobs(local_study, world, tmp_path, capsys):
    """A long study's interim answer: --aggregate-only changes no job (a missing one stays missing,
    a damaged one stays damaged and unread) and writes the aggregate of the jobs that verify."""
    copy = tmp_path / "copy"
    shutil.copytree(local_study, copy)
    shutil.rmtree(copy / "jobs" / "tiny-qwen3" / "ia3" / "seed1")
    (copy / "jobs" / "tiny-qwen3" / "lora" / "seed1" / "run" / "summary.tsv").write_text("damaged\n")
    jobs_before = _tree(copy / "jobs")
    capsys.readouterr()
    assert cli.main(["study", str(world["spec"]), "--out", str(copy), "--aggregate-only", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("2 of 4 jobs done (0 run by this command)")
    assert _tree(copy / "jobs") == jobs_before
    per_job = pl.read_csv(copy / "study" / "per_job.tsv", separator="\t")
    assert per_job["job"].to_list() == ["tiny-qwen3/lora/seed0", "tiny-qwen3/ia3/seed0"]
    conclusion = (copy / "study" / "conclusion.md").read_text()
    assert "2 of 4 jobs finished; 2 not finished (listed at the end)." in conclusion
    assert "`tiny-qwen3/ia3/seed1` (-): not finished (missing)" in conclusion
    # the aggregate of the finished jobs is the same numbers as the full study's rows for them
    full = pl.read_csv(local_study / "study" / "per_job.tsv", separator="\t")
    assert per_job.equals(full.filter(pl.col("job").is_in(per_job["job"].to_list())))
    for argv, message in ((["--overwrite"], "does not go with --overwrite"), ([], "is not a study folder")):
        out = copy if argv else tmp_path / "none"
        assert cli.main(["study", str(world["spec"]), "--out", str(out), "--aggregate-only", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_merge_joins_another_folders_jobs_and_gives_the_full_studys_tables(local_study, world, tmp_path, capsys):
    """A study split over two machines without a shared file system: each aggregates its own jobs,
    and --merge joins the other's inputs.json by job hash: the tables and figures' numbers are the
    uninterrupted study's, byte for byte; the conclusion and the manifest say which jobs were merged."""
    from subspace_sweep.provenance import sha256_file

    here, there = tmp_path / "here", tmp_path / "there"
    for folder, drop in ((here, ["ia3/seed1"]), (there, ["lora/seed0", "lora/seed1", "ia3/seed0"])):
        shutil.copytree(local_study, folder)
        for job in drop:
            shutil.rmtree(folder / "jobs" / "tiny-qwen3" / job)
        assert cli.main(["study", str(world["spec"]), "--out", str(folder), "--aggregate-only", "--quiet"]) == 0
    other = there / "study" / "inputs.json"
    assert cli.main(["study", str(world["spec"]), "--out", str(here), "--aggregate-only", "--quiet",
                     "--merge", str(other)]) == 0
    for name in ("per_job.tsv", "claims.tsv", "across_families.tsv", "winners.tsv", "kendall.tsv",
                 "gain_w_combined.tsv", "gradients.tsv", "claims_residual.tsv"):
        assert (here / "study" / name).read_bytes() == (local_study / "study" / name).read_bytes(), name
    conclusion = (here / "study" / "conclusion.md").read_text()
    assert "4 of 4 jobs finished. 1 of the finished jobs were merged from another aggregate's inputs" in conclusion
    manifest = json.loads((here / "study" / "manifest.json").read_text())
    assert manifest["merged"] == {"tiny-qwen3/ia3/seed1": sha256_file(other)}
    # refused, naming the file, before anything is written: without --aggregate-only, a job made with other
    # settings, a job of another spec, a row that does not say its view (written before it was kept), not an
    # aggregate's inputs
    data = json.loads(other.read_text())
    changed, foreign, junk = tmp_path / "changed.json", tmp_path / "foreign.json", tmp_path / "junk.json"
    viewless = tmp_path / "viewless.json"
    changed.write_text(json.dumps({**data, "rows": [{**data["rows"][0], "job_hash": "0" * 64}]}))
    viewless.write_text(json.dumps({**data, "rows": [{k: v for k, v in data["rows"][0].items() if k != "view"}]}))
    foreign.write_text(json.dumps({**data, "rows": [{**data["rows"][0], "job": "tiny-qwen3/dora/seed0"}]}))
    junk.write_text("[1, 2]")
    before = _tree(here)
    capsys.readouterr()
    for argv, message in (([str(other)], "it goes with --aggregate-only"),
                          ([str(changed), "--aggregate-only"], "job tiny-qwen3/ia3/seed1 was made with other settings"),
                          ([str(foreign), "--aggregate-only"], "job 'tiny-qwen3/dora/seed0' is not a job of this spec"),
                          ([str(viewless), "--aggregate-only"], "job tiny-qwen3/ia3/seed1 does not say which view"),
                          ([str(junk), "--aggregate-only"], "not a study aggregate's inputs.json")):
        assert cli.main(["study", str(world["spec"]), "--out", str(here), "--merge", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and (argv[0] in err or "--aggregate-only" in message), err
    assert _tree(here) == before


def test_only_runs_the_matching_jobs_and_the_aggregate_lists_the_rest(local_study, world, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(local_study, copy)
    for job in ("lora/seed1", "ia3/seed1"):
        shutil.rmtree(copy / "jobs" / "tiny-qwen3" / job)
    outcome = run_study(world["spec"], copy, progress=False, only=["tiny-qwen3/ia3/*"])
    assert outcome.ran == ["tiny-qwen3/ia3/seed1"]
    assert outcome.states["tiny-qwen3/lora/seed1"] == "missing" and outcome.states["tiny-qwen3/ia3/seed1"] == "done"
    for name in ("summary.tsv", "causal.tsv"):  # the same job (deterministic), not another
        assert (copy / "jobs" / "tiny-qwen3" / "ia3" / "seed1" / "run" / name).read_bytes() == \
            (local_study / "jobs" / "tiny-qwen3" / "ia3" / "seed1" / "run" / name).read_bytes()
    assert "`tiny-qwen3/lora/seed1` (-): not finished (missing)" in (copy / "study" / "conclusion.md").read_text()
    capsys.readouterr()
    assert cli.main(["study", str(world["spec"]), "--out", str(copy), "--only", "tiny-qwen3/dora/*"]) == 2
    assert "--only 'tiny-qwen3/dora/*' matches no job of the spec" in capsys.readouterr().err


def test_a_damaged_output_is_redone_not_trusted(local_study, world, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(local_study, copy)
    job = copy / "jobs" / "tiny-qwen3" / "ia3" / "seed1"
    (job / "run" / "summary.tsv").write_text("damaged\n")
    outcome = run_study(world["spec"], copy, progress=False)
    assert outcome.ran == ["tiny-qwen3/ia3/seed1"]
    record = json.loads((job / RECORD).read_text())
    assert record["status"] == "done"
    assert _tree(copy / "study") == _tree(local_study / "study")


def test_a_step_of_an_older_version_is_redone_with_the_steps_after_it_and_the_pair_kept(local_study, world, tmp_path):
    """Found with the gradient cache (issue 34): the study's delta step wrote no adapter record, so
    each job's run built the gradient bases from seed 0's examples with the family variant empty. A
    job recorded by that version (its steps without a version, the delta file without the record)
    redoes its delta and run on resume, keeping its trained pair; the delta then records the family
    and seed, and the job's tables and the aggregate are the current study's byte for byte."""
    from subspace_sweep.delta import load_adapter_record, load_centre, load_delta, save_delta
    from subspace_sweep.provenance import sha256_file

    copy = tmp_path / "copy"
    shutil.copytree(local_study, copy)
    job = copy / "jobs" / "tiny-qwen3" / "lora" / "seed1"
    delta = job / "w.safetensors"
    assert load_adapter_record(delta)["seed"] == 1  # what the current delta step writes
    save_delta(load_delta(delta), delta, centre=load_centre(delta))  # what version 1 wrote
    assert load_adapter_record(delta) is None
    record = json.loads((job / RECORD).read_text())
    assert {step: entry["version"] for step, entry in record["steps"].items()} == {"train": 1, "delta": 2, "run": 1}
    for entry in record["steps"].values():
        del entry["version"]
    record["steps"]["delta"]["files"] = {delta.name: sha256_file(delta)}  # its files verify: only the version is old
    (job / RECORD).write_text(json.dumps(record))
    pair = _tree(job / "pair")
    outcome = run_study(world["spec"], copy, progress=False)
    assert outcome.ran == ["tiny-qwen3/lora/seed1"]
    redone = json.loads((job / RECORD).read_text())
    assert redone["steps"]["train"] == record["steps"]["train"] and _tree(job / "pair") == pair  # not retrained
    assert redone["steps"]["delta"]["version"] == 2 and load_adapter_record(delta)["seed"] == 1
    want = local_study / "jobs" / "tiny-qwen3" / "lora" / "seed1"
    tables = {k: v for k, v in _tree(job / "run").items() if k.endswith((".tsv", ".csv"))}
    assert tables and tables == {k: v for k, v in _tree(want / "run").items() if k in tables}
    assert _tree(copy / "study") == _tree(local_study / "study")


def test_a_killed_study_resumes_and_its_aggregate_equals_the_uninterrupted_one(world, local_study):
    """SIGKILL in the middle of a job, then the same command. The study is a copy of the local one
    without its last job, its A-side cache and its aggregate: the job left builds the A-side and is
    killed (in a subprocess) while it stores the cache entry, after its pair and delta were
    published; the rerun verifies the three finished jobs, cleans the dead staging and redoes that
    job alone (one job's cost, not four), and the aggregate is the uninterrupted study's byte for byte."""
    root, spec = world["root"], world["spec"]
    killed = root / "killed"
    shutil.copytree(local_study, killed)
    job = killed / "jobs" / "tiny-qwen3" / "ia3" / "seed1"
    for gone in (job, killed / "cache", killed / "study"):
        shutil.rmtree(gone)
    paused = Paused.start("study", "cache_staged", ["study", str(spec), "--out", str(killed), "--quiet"], root / "paused")
    assert paused.kill() == -signal.SIGKILL
    record = json.loads((job / RECORD).read_text())
    assert set(record["steps"]) == {"train", "delta"} and not (job / "run").exists()
    assert any(p.name.startswith(".a-side.") or ".stage-" in p.name for p in (killed / "cache").rglob("*"))
    outcome = run_study(spec, killed, progress=False)
    assert outcome.ran == ["tiny-qwen3/ia3/seed1"]
    assert not [p for p in killed.rglob("*") if ".stage-" in p.name]
    assert _tree(killed / "study") == _tree(local_study / "study")


def test_the_submitit_local_cluster_runs_the_same_jobs(world, local_study):
    """The cluster path (submitit's local executor: subprocesses, as SLURM array tasks run) on a copy
    of the local study with one job removed: it runs that job alone (the others verify as done, so
    one job's cost, not four), and the job's outputs and the aggregate are the local study's byte for
    byte."""
    pytest.importorskip("submitit")
    out = world["root"] / "submitit"
    shutil.copytree(local_study, out)
    job = Path("jobs") / "tiny-qwen3" / "ia3" / "seed1"
    shutil.rmtree(out / job)
    shutil.rmtree(out / "study")
    assert cli.main(["study", str(world["spec"]), "--out", str(out), "--executor", "submitit-local", "--quiet"]) == 0
    assert list((out / "logs").iterdir()), "submitit keeps its logs in the study folder"
    assert json.loads((out / job / RECORD).read_text())["status"] == "done"
    tables = {k: v for k, v in _tree(out / job / "run").items() if k.endswith((".tsv", ".csv"))}
    assert tables and tables == {k: v for k, v in _tree(local_study / job / "run").items() if k in tables}
    assert _tree(out / "study") == _tree(local_study / "study")


def test_a_changed_spec_is_refused_naming_what_changed(world, local_study, tmp_path, capsys):
    spec = tmp_path / "changed.toml"
    spec.write_text(world["spec"].read_text().replace("steps = 4", "steps = 5").replace('"tiny-qwen3"',
                                                                                         f'"{world["root"] / "tiny-qwen3"}"'))
    before = _tree(local_study)
    capsys.readouterr()
    assert cli.main(["study", str(spec), "--out", str(local_study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.steps: 4 -> 5" in err[0] and "--overwrite" in err[0]
    assert _tree(local_study) == before


def test_a_job_that_cannot_train_is_recorded_and_the_others_finish(world, tmp_path, capsys):
    spec = tmp_path / "fails.toml"
    spec.write_text(f'models = ["{world["root"] / "tiny-qwen3"}"]\nfamilies = ["lora", "boft"]\nseeds = [0]\n'
                    '[train]\nrank = 4\nlayers = "1..2"\nsteps = 2\nlr = 2e-3\n'
                    '[train.boft]\nrank = 5\n'  # BOFT blocks of 5 do not divide the width 64: peft refuses
                    '[run]\nn_boot = 0\n')
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["study", str(spec), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "job tiny-qwen3/boft/seed0 failed at train:" in err
    record = json.loads((out / "jobs" / "tiny-qwen3" / "boft" / "seed0" / RECORD).read_text())
    assert record["status"] == "failed" and record["failed_step"] == "train" and "\n" not in record["error"]
    per_job = pl.read_csv(out / "study" / "per_job.tsv", separator="\t")
    assert per_job["job"].to_list() == ["tiny-qwen3/lora/seed0"]
    conclusion = (out / "study" / "conclusion.md").read_text()
    assert "1 of 2 jobs finished; 1 failed (listed at the end)." in conclusion and "tiny-qwen3/boft/seed0" in conclusion


BAD_SPECS = {
    "unknown key": ('models = ["M"]\nfamilys = ["lora"]\n', "unknown key 'familys' (did you mean 'families'?)"),
    "unknown family": ('models = ["M"]\nfamilies = ["lora", "qlora"]\n', "unknown adapter family 'qlora'"),
    "empty seeds": ('models = ["M"]\nseeds = []\n', "seeds must be a non-empty list"),
    "negative seed": ('models = ["M"]\nseeds = [-1]\n', "every seed must be an integer in 0..4294967295"),
    "no models": ('families = ["lora"]\n', "models must be a non-empty list"),
    "bad run option": ('models = ["M"]\n[run]\ncausal = 1\ncausal_null = 2\n', "--causal-null must be at least 5"),
    "unknown run key": ('models = ["M"]\n[run]\nrank = 8\n', "unknown key 'rank'"),
    "grid under a KL budget": ('models = ["M"]\n[run]\ncausal = 1\ncausal_alpha = [0.5, 1.0]\n',
                               "--causal-alpha [0.5, 1.0] is the grid of --causal-strength grid"),
    "bad lr": ('models = ["M"]\n[train]\nlr = -1.0\n', "train.lr must be a finite number above 0"),
    "not toml": ('models = [\n', "is not valid TOML"),
    "model missing": ('models = ["no-such-folder/model"]\n', "is not a model folder, GGUF file, known name or HF id"),
    "model without weights": ('models = ["EMPTY"]\n', "has no weights"),
    "layers outside": ('models = ["M"]\n[train]\nlayers = "1..9"\n', "train.layers [4, 5, 6, 7, 8, 9] outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_exit_2_with_one_line_before_any_job(world, tmp_path, capsys, case):
    text, message = BAD_SPECS[case]
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 4}))
    spec = tmp_path / "bad.toml"
    spec.write_text(text.replace('"M"', f'"{world["root"] / "tiny-qwen3"}"').replace('"EMPTY"', f'"{empty}"'))
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["study", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("subspace-sweep study: error:") and message in err[0], err
    assert not out.exists()


def test_the_spec_reads_defaults_overrides_and_relative_paths(world):
    spec = load_spec(world["spec"])
    assert [j.id for j in spec.jobs] == ["tiny-qwen3/lora/seed0", "tiny-qwen3/lora/seed1", "tiny-qwen3/ia3/seed0",
                                         "tiny-qwen3/ia3/seed1"]
    lora, ia3 = spec.jobs[0], spec.jobs[2]
    assert lora.model == str((world["root"] / "tiny-qwen3").resolve())
    assert lora.train["lr"] == 2e-3 and ia3.train["lr"] == 2e-2 and lora.train["layers"] == [1, 2]
    assert lora.hash != spec.jobs[1].hash and lora.hash == load_spec(world["spec"]).jobs[0].hash


def test_the_study_report_opens_offline_with_its_figures_and_job_links(local_study):
    """report.html of the aggregate (issue 33's study page): forest plot and heatmap decode, the
    claims table is claims.tsv, each job's run report is linked by a relative path that opens, and
    nothing is loaded from outside the file."""
    from tests.helpers_report import Browser, browser_unavailable, check_self_contained, image_widths, tsv_rows

    if browser_unavailable():
        pytest.skip(f"browser tests: {browser_unavailable()}")
    from selenium.webdriver.common.by import By

    agg = local_study / "study"
    browser = Browser()
    try:
        browser.open(agg / "report.html")
        widths = image_widths(browser)
        assert len(widths) == 2 and min(widths) > 0
        header, rows = browser.table("claims")
        assert rows == tsv_rows(agg / "claims.tsv", header)
        links = [a.get_attribute("href") for a in browser.driver.find_elements(By.CSS_SELECTOR, "ul.runs a")]
        jobs = ["tiny-qwen3/lora/seed0", "tiny-qwen3/lora/seed1", "tiny-qwen3/ia3/seed0", "tiny-qwen3/ia3/seed1"]
        assert links == [(local_study / "jobs" / j / "run" / "report.html").resolve().as_uri() for j in jobs]
        check_self_contained(browser, agg, allowed_links={f"../jobs/{j}/run/report.html" for j in jobs})
        browser.driver.find_element(By.CSS_SELECTOR, "ul.runs a").click()
        assert browser.driver.current_url == links[0]
    finally:
        browser.close()


def test_the_aggregate_reads_no_retention_curve(local_study, tmp_path):
    """What lets the real study skip the curves (a third of each run): a job's numbers are the same
    with its causal.tsv's curve rows removed."""
    from subspace_sweep.study_aggregate import job_results

    run = local_study / "jobs" / "tiny-qwen3" / "lora" / "seed0" / "run"
    causal = pl.read_csv(run / "causal.tsv", separator="\t", infer_schema_length=None)
    assert (causal["kind"] == "curve").sum() > 0  # the tiny study computes them (the default ranks)
    bare = tmp_path / "run"
    shutil.copytree(run, bare)
    causal.filter(pl.col("kind") != "curve").write_csv(bare / "causal.tsv", separator="\t")
    with_curves, without = job_results(run)[0], job_results(bare)[0]
    assert with_curves.keys() == without.keys()
    assert all(with_curves[k] == without[k] or (with_curves[k] != with_curves[k] and without[k] != without[k])
               for k in with_curves)  # equal, or NaN in both


def _first_tested(run: Path) -> str:
    causal = pl.read_csv(run / "causal.tsv", separator="\t", infer_schema_length=None)
    return causal.filter(pl.col("kind") == "candidate")["name"][0]


def test_a_job_is_read_in_the_view_its_run_leads_with(local_study, tmp_path):
    """SPEC §12: where a run's outlier-coordinate warning fired, its conclusion and its causal check
    lead with the standardized view, and so do the study's numbers of that job (the claims, the
    ranking, the winner: the candidate the causal check tested first), the residual view's beside
    them. Without the warning (the tiny run), the residual view. The warning is planted in a copy of
    a tiny run's conclusion: its numbers must then be the standardized columns', computed here from
    the run's own files."""
    from subspace_sweep.compare import OUTLIER_WARNING_MARK
    from subspace_sweep.study_aggregate import hypotheses, job_results

    run = local_study / "jobs" / "tiny-qwen3" / "lora" / "seed0" / "run"
    plain = job_results(run)[0]
    assert plain["view"] == "residual" and plain["winner"] == _first_tested(run) == plain["winner_residual"]
    assert all(plain[f"{c}_residual"] == plain[c] for c in ("top5_overlap", "write_best_gain_w", "best_share"))

    warned = tmp_path / "run"
    shutil.copytree(run, warned)
    with (warned / "conclusion.md").open("a", encoding="utf-8") as f:
        f.write(f"\n- {OUTLIER_WARNING_MARK}: planted by the test.\n")
    numbers, gains = job_results(warned)
    summary = pl.read_csv(run / "summary.tsv", separator="\t", infer_schema_length=None)
    hyp = hypotheses(summary)
    joint = summary.filter(pl.col("panel") == "joint")
    assert numbers["view"] == "standardized"
    assert numbers["ranking"] == joint.sort("rank_in_panel_std")["candidate"].to_list()
    assert numbers["winner"] == numbers["ranking"][0] and numbers["winner_residual"] == plain["winner"]
    assert numbers["best_gain_w"] == float(hyp["gain_w_combined_std"].max())
    assert numbers["best_gain_w"] != plain["best_gain_w"]  # the two views differ on this run
    layers = pl.read_csv(run / "per_layer.csv").filter(pl.col("candidate").is_in(hyp["candidate"].to_list()))
    share = layers.group_by("candidate").agg(pl.col("pct_oracle_combined_std").mean()).sort(
        "pct_oracle_combined_std", descending=True).row(0)
    assert (numbers["best_share_candidate"], numbers["best_share"]) == (share[0], pytest.approx(share[1] / 100, abs=1e-12))
    assert numbers["best_share"] != plain["best_share"]
    write = hyp.filter(pl.col("family").is_in(["W:write", "W:write-not-read"]))
    assert numbers["write_best_gain_w"] == float(write["gain_w_combined_std"].max())
    assert numbers["write_mean_z_w"] == pytest.approx(float(write["z_w_combined_std"].mean()), rel=1e-12)
    assert {c: numbers[f"{c}_residual"] for c in ("top5_overlap", "write_best_gain_w", "best_share")} == {
        c: plain[c] for c in ("top5_overlap", "write_best_gain_w", "best_share")}
    assert numbers["winner_kept"] == plain["winner_kept"]  # the causal numbers do not depend on the view
    panel = joint.filter(pl.col("axis_kind") != "null")  # the heatmap's gains, in the same view
    assert gains == [{"candidate": c, "gain_w_combined": g} for c, g in zip(panel["candidate"], panel["gain_w_combined_std"])]


def test_the_real_study_spec_spans_every_family_and_both_real_models():
    """examples/study-smollm2.toml (`make study-real`): SmolLM2 × every family train supports × 3
    seeds and Gemma-3-270m × LoRA × 3 seeds, at one training recipe, without the curves."""
    from subspace_sweep.study import adapter_families

    spec = load_spec(ROOT / "examples" / "study-smollm2.toml")
    ids = [j.id for j in spec.jobs]
    smol = [f"smollm2-135m-instruct/{f}/seed{s}" for f in adapter_families() for s in (0, 1, 2)]
    assert sorted(ids) == sorted(smol + [f"gemma-3-270m/lora/seed{s}" for s in (0, 1, 2)])
    assert all(j.run["causal"] == 1 and j.run["causal_curve"] == [] and j.train["steps"] == 20 for j in spec.jobs)
