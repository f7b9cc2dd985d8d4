"""Studies (issue 32, SPEC §12): the seed's question over models × adapter families × seeds.

``subspace-sweep study STUDY.toml --out DIR`` reads a spec (``load_spec``: the models, the
behaviour, the adapter families, the training seeds, the training and run settings, the cluster
settings) and runs one *job* per model × family × seed: ``train`` → ``delta`` → ``run``, each step
published like every output of this tool (``publish.py``: staged, renamed into place) under
``DIR/jobs/<model>/<family>/seed<N>/`` (``pair/``, ``w.safetensors``, ``run/``). The jobs of a
model share its A-side through the A-side cache (``DIR/cache/a-side``: the first job builds it,
the others load it; SPEC §5's byte-identical cache), the gradient bases of each training seed
through the same folder (their family variant is each job's own), and its converted GGUF through
the model cache. Then the aggregate (``study_aggregate``) is published whole as ``DIR/study/``.

Resuming. Each job keeps a record (``job.json``) of the steps it finished: the sha256 of every
file a step wrote, and the job's hash (what the job is: model, family, seed, settings, the
behaviour file's sha256). Running the same spec again redoes only what is missing, failed or no
longer verifies: a step is done when its record's hashes match the files on disk now (outputs are
verified, never trusted) and this version of the step wrote them (``STEP_VERSIONS``); the first
step that is not done is redone, and every step after it.
A killed study (SIGKILL, a node lost) therefore resumes where it stopped: what the killed step had
staged is deleted by the next write into that folder (``publish.recover``), and because training,
the delta and the run are deterministic, the resumed study's aggregate equals an uninterrupted
one's byte for byte (a test holds it to that). A spec that differs from the one the folder was
made with is refused, naming what changed, unless ``--overwrite`` (jobs whose hash changed are
redone; jobs the new spec no longer has are deleted). A job that fails records its step and its
one-line error, and the others go on; the command then exits 1 naming them.

Executors (no scheduler of our own): ``local`` runs the jobs one at a time in this process;
``slurm`` submits them as one job array through submitit (``[slurm]`` settings: partition,
time, GPUs, CPUs, memory, array parallelism), waits and aggregates; ``submitit-local`` runs the
same submitit path with its local cluster (real subprocesses, the same pickling, folders and
logs: how the cluster path is tested without SLURM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import time
import tomllib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: Bump when the layout of a study folder or a job record changes.
STUDY_FORMAT = 1
STUDY_FILE = "study.json"  # the normalised spec the folder was made with
LOCK_FILE = ".study.lock"
RECORD = "job.json"
AGGREGATE = "study"
STEPS = ("train", "delta", "run")
#: What each step's code writes, by version: a step recorded by an older version is redone (and every
#: step after it), its files hashing as recorded or not. delta 2: the file records the adapters' family
#: and seed (version 1's did not: its run scored the gradient bases of seed 0's examples, family variant
#: empty). A record without a version is version 1.
STEP_VERSIONS = {"train": 1, "delta": 2, "run": 1}
EXECUTORS = ("local", "slurm", "submitit-local")

SPEC_KEYS = ("models", "families", "seeds", "behaviour", "train", "run", "slurm")
MODEL_KEYS = ("name", "families", "seeds", "train", "run")
TRAIN_KEYS = ("rank", "alpha", "layers", "target_modules", "steps", "lr", "n_train")
#: SweepConfig fields a study sets itself (each job's delta, run folder, cache, overwriting, quietness,
#: the behaviour, which is the study's, and n_train, which is the training's: the gradient bases read
#: the examples the pair trained on, SPEC §13).
_RUN_OWN = ("model", "delta", "out", "a_side_cache", "overwrite", "quiet", "behaviour", "n_train")
SLURM_KEYS = ("partition", "time_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism", "account",
              "qos", "constraint")
SEED_MAX = 2**32 - 1


def adapter_families() -> tuple[str, ...]:
    from .lora_train import ADAPTER_FAMILIES

    return ADAPTER_FAMILIES


def run_keys() -> tuple[str, ...]:
    from .config import SweepConfig

    return tuple(f.name for f in dataclasses.fields(SweepConfig) if f.name not in _RUN_OWN)


# ------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Job:
    """One model × family × seed: train → delta → run."""

    model: str  # what --model takes
    slug: str  # the model's folder name under jobs/
    family: str
    seed: int
    train: Mapping[str, object]
    run: Mapping[str, object]
    behaviour: str | None
    behaviour_sha256: str | None

    @property
    def id(self) -> str:
        return f"{self.slug}/{self.family}/seed{self.seed}"

    @property
    def hash(self) -> str:
        what = {"model": self.model, "family": self.family, "seed": self.seed, "train": dict(self.train),
                "run": dict(self.run), "behaviour": self.behaviour, "behaviour_sha256": self.behaviour_sha256}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StudySpec:
    spec: Mapping[str, object]  # normalised (what study.json stores and a rerun compares)
    jobs: tuple[Job, ...]
    slurm: Mapping[str, object]

    def job(self, job_id: str) -> Job:
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise KeyError(job_id)


def _where(path: str, key: str) -> str:
    return f"{path}: {key}"


def _check_keys(table: object, allowed: Sequence[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise InputError(f"{where} must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{where}: unknown key {unknown[0]!r}{hint}; known keys: {', '.join(allowed)}")
    return dict(table)


def _slug(model: str) -> str:
    text = str(model).strip().rstrip("/")
    name = Path(text).name if ("/" in text and Path(text).expanduser().exists()) or text.endswith(".gguf") else text
    if name.lower().endswith(".gguf"):
        name = name[:-5]
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "model"


def _layers(value: object, where: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        from .config import parse_layers as parse

        try:
            return list(parse(value))
        except ValueError as e:
            raise InputError(f"{where}: cannot read layers {value!r} ({e})") from None
    if isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return sorted(set(value))
    raise InputError(f"{where}: layers must be a string such as \"8..21\" or a non-empty list of integers")


def _normalise_train(table: object, where: str, families: Sequence[str]) -> dict:
    """Training settings; a sub-table named after a family overrides them for that family."""
    t = _check_keys(table if table is not None else {}, (*TRAIN_KEYS, *adapter_families()), where)
    out: dict = {}
    for key, value in t.items():
        if key in adapter_families():
            out[key] = _normalise_train(value, f"{where}.{key}", families)
        elif key == "layers":
            out[key] = _layers(value, f"{where}.layers")
        elif key == "target_modules":
            mods = value.replace(",", " ").split() if isinstance(value, str) else value
            if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
                raise InputError(f"{where}.target_modules must be a list of projection names")
            out[key] = list(mods)
        else:
            out[key] = value
    return out


def _train_for(train: Mapping[str, object], family: str) -> dict:
    """A family's training settings: the shared ones with its own sub-table's on top."""
    shared = {k: v for k, v in train.items() if k not in adapter_families()}
    return {**shared, **dict(train.get(family) or {})}


def _check_train_values(train: Mapping[str, object], where: str) -> None:
    for key, kind in (("rank", int), ("steps", int), ("n_train", int)):
        if key in train and (not isinstance(train[key], kind) or isinstance(train[key], bool) or train[key] < 1):
            raise InputError(f"{where}.{key} must be a positive integer, got {train[key]!r}")
    for key in ("lr", "alpha"):
        if key in train:
            v = train[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{where}.{key} must be a finite number above 0, got {v!r}")


def _normalise_run(table: object, where: str) -> dict:
    from .config import SweepConfig

    t = _check_keys(table if table is not None else {}, run_keys(), where)
    if "layers" in t:
        t["layers"] = _layers(t["layers"], f"{where}.layers")
    for key, value in list(t.items()):
        if isinstance(value, list) and key != "layers":
            t[key] = list(value)
    try:
        config = SweepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
    except TypeError as e:
        raise InputError(f"{where}: {e}") from None
    try:
        config.validate()
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    return t


def _file_sha256(path: Path) -> str:
    from .provenance import sha256_file

    return sha256_file(path)


def load_spec(path: str | os.PathLike) -> StudySpec:
    """The study spec of a TOML file, checked whole before any job starts: unknown keys (named,
    with the nearest known one), unknown families, an empty or invalid seed list, bad training or
    run settings, a behaviour file that cannot be read; InputError naming the file and the key.
    Whether each model loads is checked by ``check_models`` (it reads the models' configs)."""
    from .causal import read_behaviour_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"study spec {path}: no such file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"study spec {path} is not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"study spec {path} is not valid TOML ({e})") from None
    top = _check_keys(raw, SPEC_KEYS, f"study spec {path}")
    here = p.resolve().parent
    families_all = adapter_families()

    def families_of(value: object, where: str) -> list[str]:
        fams = list(families_all) if value is None else value
        if not isinstance(fams, list) or not fams or not all(isinstance(f, str) for f in fams):
            raise InputError(f"{where}: families must be a non-empty list of adapter family names")
        bad = [f for f in fams if f not in families_all]
        if bad:
            raise InputError(f"{where}: unknown adapter family {bad[0]!r}; one of {', '.join(families_all)}")
        if len(set(fams)) != len(fams):
            raise InputError(f"{where}: families lists a family twice")
        return fams

    def seeds_of(value: object, where: str) -> list[int]:
        seeds = [0, 1, 2] if value is None else value
        if not isinstance(seeds, list) or not seeds:
            raise InputError(f"{where}: seeds must be a non-empty list of integers (e.g. [0, 1, 2])")
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in seeds):
            raise InputError(f"{where}: every seed must be an integer in 0..{SEED_MAX}, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise InputError(f"{where}: seeds lists a seed twice")
        return list(seeds)

    where = f"study spec {path}"
    families = families_of(top.get("families"), where)
    seeds = seeds_of(top.get("seeds"), where)
    behaviour = top.get("behaviour")
    behaviour_sha = None
    if behaviour is not None:
        if not isinstance(behaviour, str) or not behaviour.strip():
            raise InputError(f"{where}: behaviour must be the path of a behaviour file (JSONL)")
        bpath = (here / behaviour).resolve() if not Path(behaviour).expanduser().is_absolute() else Path(behaviour).expanduser()
        read_behaviour_file(str(bpath))
        behaviour, behaviour_sha = str(bpath), _file_sha256(bpath)
    train = _normalise_train(top.get("train"), f"{where}: train", families)
    run = _normalise_run(top.get("run"), f"{where}: run")
    slurm = _check_keys(top.get("slurm") or {}, SLURM_KEYS, f"{where}: slurm")
    models_raw = top.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise InputError(f"{where}: models must be a non-empty list (model names, folders, GGUF files, or tables "
                         "with name and overrides)")
    models, jobs, slugs = [], [], {}
    for i, m in enumerate(models_raw):
        mwhere = f"{where}: models[{i}]"
        table = {"name": m} if isinstance(m, str) else _check_keys(m, MODEL_KEYS, mwhere)
        name = table.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{mwhere}: a model needs a name (an HF id, a folder, a .gguf file or a known name)")
        local = here / name
        model = str(local.resolve()) if not Path(name).is_absolute() and local.exists() else name
        slug = _slug(model)
        if slug in slugs:
            raise InputError(f"{mwhere}: {name!r} and {slugs[slug]!r} would share the job folder {slug!r}")
        slugs[slug] = name
        fams = families_of(table.get("families"), mwhere) if "families" in table else families
        sds = seeds_of(table.get("seeds"), mwhere) if "seeds" in table else seeds
        mtrain = {**train, **_normalise_train(table.get("train"), f"{mwhere}.train", fams)}
        mrun = {**run, **_normalise_run(table.get("run"), f"{mwhere}.run")}
        _normalise_run(mrun, f"{mwhere}.run")
        for fam in fams:
            _check_train_values(_train_for(mtrain, fam), f"{mwhere}.train")
        models.append({"name": model, "slug": slug, "families": fams, "seeds": sds, "train": mtrain, "run": mrun})
        for fam in fams:
            for seed in sds:
                jobs.append(Job(model, slug, fam, seed, _train_for(mtrain, fam), mrun, behaviour, behaviour_sha))
    spec = {"format": STUDY_FORMAT, "models": models, "behaviour": behaviour, "behaviour_sha256": behaviour_sha,
            "slurm": slurm}
    return StudySpec(spec, tuple(jobs), slurm)


def check_models(spec: StudySpec) -> None:
    """Every model of the spec, from its files alone (a folder's config and weights, a GGUF's
    header, a known name's package; an HF id must be in the local cache): before any job starts.
    Each job's training layers and run options are checked against the model's shape too."""
    from transformers import AutoConfig

    from . import preflight
    from .config import SweepConfig

    for m in spec.spec["models"]:
        try:
            shape = preflight.model_shape(m["name"])
            if shape is None:
                AutoConfig.from_pretrained(m["name"], local_files_only=True)
        except InputError as e:
            raise InputError(f"study model {m['name']!r}: {e}") from None
        except (OSError, ValueError) as e:
            raise InputError(f"study model {m['name']!r} is not a model folder, GGUF file, known name or HF id in the "
                             f"local cache ({str(e).splitlines()[0][:160]})") from None
        if shape is None:
            continue
        config = SweepConfig(model=m["name"], **{k: tuple(v) if isinstance(v, list) else v for k, v in m["run"].items()})
        try:
            config.validate_for_model(shape.d, shape.n_layers, shape.where)
        except InputError as e:
            raise InputError(f"study model {m['name']!r}, run settings: {e}") from None
        for fam in m["families"]:
            layers = _train_for(m["train"], fam).get("layers")
            bad = sorted(x for x in layers or () if not 0 <= x < shape.n_layers)
            if bad:
                raise InputError(f"study model {m['name']!r}, train.layers {bad} outside the model's layers "
                                 f"0..{shape.n_layers - 1}")


def spec_changes(old: Mapping[str, object], new: Mapping[str, object], prefix: str = "") -> list[str]:
    """What differs between two normalised specs, one line per changed key (models by name)."""
    out: list[str] = []
    if isinstance(old, dict) and isinstance(new, dict):
        if prefix == "" and isinstance(old.get("models"), list) and isinstance(new.get("models"), list):
            om = {m["name"]: m for m in old["models"]}
            nm = {m["name"]: m for m in new["models"]}
            out += [f"model {n!r} removed" for n in om if n not in nm]
            out += [f"model {n!r} added" for n in nm if n not in om]
            for n in om:
                if n in nm:
                    out += spec_changes(om[n], nm[n], f"models[{n}].")
            old = {k: v for k, v in old.items() if k != "models"}
            new = {k: v for k, v in new.items() if k != "models"}
        for key in sorted(set(old) | set(new)):
            if key not in old:
                out.append(f"{prefix}{key} added ({new[key]!r})")
            elif key not in new:
                out.append(f"{prefix}{key} removed (was {old[key]!r})")
            else:
                out += spec_changes(old[key], new[key], f"{prefix}{key}.")
    elif old != new:
        out.append(f"{prefix.rstrip('.')}: {old!r} -> {new!r}")
    return out


# ------------------------------------------------------------------------------- a job


@dataclass(frozen=True)
class JobPaths:
    root: Path

    @property
    def pair(self) -> Path:
        return self.root / "pair"

    @property
    def delta(self) -> Path:
        return self.root / "w.safetensors"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def record(self) -> Path:
        return self.root / RECORD

    def output(self, step: str) -> Path:
        return {"train": self.pair, "delta": self.delta, "run": self.run}[step]


def job_paths(study_dir: Path, job: Job) -> JobPaths:
    return JobPaths(study_dir / "jobs" / job.slug / job.family / f"seed{job.seed}")


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every regular file at ``path`` (a file, or a folder's files by relative path)."""
    from .provenance import sha256_file

    if path.is_file():
        return {path.name: sha256_file(path)}
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def read_record(paths: JobPaths) -> dict | None:
    try:
        record = json.loads(paths.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == STUDY_FORMAT else None


def _write_record(paths: JobPaths, record: Mapping[str, object]) -> None:
    from . import publish

    text = json.dumps(dict(record), indent=1, sort_keys=True) + "\n"
    publish.write_file(paths.record, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True,
                       what="job record")


def verified_steps(job: Job, paths: JobPaths, record: Mapping | None) -> list[str]:
    """The leading steps whose record matches this job and whose outputs hash as recorded now."""
    done: list[str] = []
    if not record or record.get("job_hash") != job.hash:
        return done
    for step in STEPS:
        entry = (record.get("steps") or {}).get(step)
        if not entry or not entry.get("files") or entry.get("version", 1) != STEP_VERSIONS[step] \
                or file_hashes(paths.output(step)) != entry["files"]:
            break
        done.append(step)
    return done


def job_state(job: Job, paths: JobPaths) -> str:
    """"done", "failed at STEP: error", "STEP done" (partial), "changed" (a record of another
    job spec) or "missing"."""
    record = read_record(paths)
    if record is None:
        return "missing"
    if record.get("job_hash") != job.hash:
        return "changed"
    done = verified_steps(job, paths, record)
    if len(done) == len(STEPS):
        return "done"
    if record.get("status") == "failed":
        return f"failed at {record.get('failed_step')}: {record.get('error')}"
    return f"{done[-1]} done" if done else "missing"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, InputError) else f"{type(e).__name__}: {text}"[:400]


def _train_step(job: Job, paths: JobPaths) -> None:
    from .train_command import train_pair_folder

    t = dict(job.train)
    train_pair_folder(job.model, paths.pair, behaviour=job.behaviour, n_train=t.get("n_train"), family=job.family,
                      rank=t.get("rank", 8), alpha=t.get("alpha"), layers=t.get("layers"),
                      **({"target_modules": t["target_modules"]} if "target_modules" in t else {}),
                      steps=t.get("steps", 20), lr=t.get("lr", 5e-4), seed=job.seed, overwrite=True, progress=False)


def _delta_step(job: Job, paths: JobPaths) -> None:
    from . import preflight
    from .delta import write_pair_delta

    out = preflight.check_delta_command(job.model, str(paths.pair / "pos"), str(paths.pair / "neg"), str(paths.delta),
                                        True)
    write_pair_delta(job.model, paths.pair / "pos", paths.pair / "neg", out, overwrite=True)  # what `delta` writes


def _run_step(job: Job, paths: JobPaths, cache: Path) -> None:
    from .config import SweepConfig
    from .sweep import run_sweeps

    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in job.run.items()}
    config = SweepConfig(model=job.model, delta=str(paths.delta), out=str(paths.run), a_side_cache=str(cache),
                         behaviour=job.behaviour, n_train=job.train.get("n_train"), overwrite=True, quiet=True,
                         **settings)
    run_sweeps(config, [str(paths.delta)])


def run_job(study_dir: str | os.PathLike, job_id: str) -> dict:
    """Run (or resume) one job of the study in ``study_dir`` (its spec from study.json): what a
    submitit worker calls, and the local executor too. Returns the job's record."""
    from .compute import return_freed_memory

    return_freed_memory()  # as the command line does: freed tensors go back to the OS between jobs
    study_dir = Path(study_dir)
    spec = _stored_spec(study_dir)
    job = spec.job(job_id)
    return _run_job(study_dir, job)


def _run_job(study_dir: Path, job: Job) -> dict:
    from .provenance import package_versions

    paths = job_paths(study_dir, job)
    paths.root.mkdir(parents=True, exist_ok=True)
    record = read_record(paths)
    done = verified_steps(job, paths, record)
    if record is None or record.get("job_hash") != job.hash:
        record = {"format": STUDY_FORMAT, "job": job.id, "job_hash": job.hash, "steps": {}}
    record["steps"] = {s: record["steps"][s] for s in done}
    record.update(status="running", failed_step=None, error=None, package_versions=package_versions())
    cache = study_dir / "cache" / "a-side"
    cache.parent.mkdir(exist_ok=True)
    for step in STEPS[len(done):]:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if step == "train":
                    _train_step(job, paths)
                elif step == "delta":
                    _delta_step(job, paths)
                else:
                    _run_step(job, paths, cache)
        except Exception as e:  # a failed job is recorded and the study goes on (KeyboardInterrupt is not caught)
            record.update(status="failed", failed_step=step, error=_one_line(e))
            _write_record(paths, record)
            return record
        notes = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught
                                   if not issubclass(w.category, (DeprecationWarning, FutureWarning))))
        record["steps"][step] = {"files": file_hashes(paths.output(step)), "version": STEP_VERSIONS[step],
                                 "seconds": round(time.perf_counter() - t0, 3), "warnings": notes}
        _write_record(paths, record)
    record["status"] = "done"
    _write_record(paths, record)
    return record


# ------------------------------------------------------------------------------- the study folder


def _stored_spec(study_dir: Path) -> StudySpec:
    """The StudySpec the folder was made with (study.json), for workers that did not parse the TOML."""
    stored = json.loads((study_dir / STUDY_FILE).read_text(encoding="utf-8"))
    return spec_from_normalised(stored["spec"])


def spec_from_normalised(spec: Mapping[str, object]) -> StudySpec:
    jobs = []
    for m in spec["models"]:
        for fam in m["families"]:
            for seed in m["seeds"]:
                jobs.append(Job(m["name"], m["slug"], fam, int(seed), _train_for(m["train"], fam), m["run"],
                                spec.get("behaviour"), spec.get("behaviour_sha256")))
    return StudySpec(dict(spec), tuple(jobs), dict(spec.get("slurm") or {}))


def is_study_folder(path: Path) -> bool:
    try:
        stored = json.loads((path / STUDY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and stored.get("kind") == "study"


def check_study_dir(out: str | os.PathLike) -> Path:
    """--out: a new folder in an existing writable parent, an empty folder, or a study folder."""
    from . import publish

    path = publish._absolute(out, "--out")
    publish._check_parent(path, out, "--out")
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise InputError(f"--out {out} is the current folder or holds it; give a new folder for the study")
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        if any(p.name != LOCK_FILE for p in path.iterdir()) and not is_study_folder(path):
            raise InputError(f"--out {out} is not empty and is not a study folder (no {STUDY_FILE} of this tool); "
                             "give a new folder")
    return path


@contextlib.contextmanager
def study_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking flock on the study folder: two study commands never work in one
    folder at once (the second exits 2); released when the process ends, however it ends."""
    import fcntl

    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"--out {path}: another study command is working in this folder") from None
        yield
    finally:
        os.close(fd)


def _write_study_file(path: Path, spec: StudySpec) -> None:
    from . import publish
    from .provenance import package_versions

    text = json.dumps({"kind": "study", "format": STUDY_FORMAT, "spec": spec.spec,
                       "package_versions": package_versions()}, indent=1, sort_keys=True) + "\n"
    publish.write_file(path / STUDY_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True,
                       what="study record")


@dataclass
class StudyOutcome:
    folder: Path
    states: dict[str, str]  # job id -> state after the command
    ran: list[str]  # the jobs this command ran (or resumed)
    aggregate: Path | None

    @property
    def failed(self) -> dict[str, str]:
        return {j: s for j, s in self.states.items() if s.startswith("failed")}


def run_study(spec_path: str | os.PathLike, out: str | os.PathLike, *, executor: str = "local",
              dry_run: bool = False, overwrite: bool = False, progress: bool = True,
              aggregate_only: bool = False, merge: Sequence[str | os.PathLike] = (),
              only: Sequence[str] = ()) -> StudyOutcome:
    """``subspace-sweep study``: check everything, run what is missing or failed, aggregate.
    ``aggregate_only``: run nothing and change no job; the aggregate of the jobs finished so far (a
    long study's interim answer: the others are listed as not finished). ``merge``: other aggregates'
    inputs.json whose jobs of this spec join where this folder has not finished them (with
    ``aggregate_only`` only: ``merged_results``). ``only``: glob patterns of job ids (``fnmatch``):
    run only the pending jobs that match one (a part of a study on this machine); the aggregate
    still covers every job of the spec."""
    import fnmatch

    from . import publish

    if executor not in EXECUTORS:
        raise InputError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if aggregate_only and (overwrite or dry_run):
        raise InputError("--aggregate-only runs nothing and changes no job: it does not go with "
                         + ("--overwrite" if overwrite else "--dry-run"))
    if merge and not aggregate_only:
        raise InputError("--merge joins other aggregates' jobs into an aggregate: it goes with --aggregate-only")
    spec = load_spec(spec_path)
    merged = merged_results(merge, spec)  # read once, here: a bad file is refused before anything is written

    def selected(job: Job, patterns: Sequence[str] = only) -> bool:
        return not patterns or any(fnmatch.fnmatchcase(job.id, p) for p in patterns)

    for pattern in only:
        if not any(selected(j, (pattern,)) for j in spec.jobs):
            raise InputError(f"--only {pattern!r} matches no job of the spec (jobs are named like {spec.jobs[0].id})")
    folder = check_study_dir(out)
    if aggregate_only and not is_study_folder(folder):
        raise InputError(f"--aggregate-only: {folder} is not a study folder (no {STUDY_FILE}): nothing to aggregate")
    if is_study_folder(folder):
        stored = json.loads((folder / STUDY_FILE).read_text(encoding="utf-8"))
        changes = spec_changes(stored.get("spec", {}), spec.spec)
        if changes and not overwrite:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise InputError(f"the spec differs from the one {folder} was made with ({shown}); pass --overwrite to "
                             "redo the jobs it changes, or give another --out")
    check_models(spec)
    if executor != "local":
        _check_submitit(executor)
    if dry_run:
        states = {j.id: job_state(j, job_paths(folder, j)) if folder.exists() else "missing" for j in spec.jobs}
        return StudyOutcome(folder, states, [], None)
    folder.mkdir(exist_ok=True)
    with study_lock(folder):
        pending: list[Job] = []
        if not aggregate_only:
            for line in publish.recover(folder):
                warnings.warn(line)
            _write_study_file(folder, spec)
            _remove_obsolete_jobs(folder, spec)
            pending = [j for j in spec.jobs if selected(j) and job_state(j, job_paths(folder, j)) != "done"]
        if executor == "local":
            _run_local(folder, spec, pending, progress)
        else:
            _run_submitit(folder, spec, pending, executor, progress)
        states = {j.id: job_state(j, job_paths(folder, j)) for j in spec.jobs}
        aggregate = write_study_aggregate(folder, spec, merged)
    return StudyOutcome(folder, states, [j.id for j in pending], aggregate)


def _remove_obsolete_jobs(folder: Path, spec: StudySpec) -> None:
    """Job folders the spec no longer has (a spec changed with --overwrite) are deleted."""
    from . import publish

    root = folder / "jobs"
    if not root.is_dir():
        return
    keep = {job_paths(folder, j).root for j in spec.jobs}
    for record in sorted(root.glob(f"*/*/*/{RECORD}")):
        if record.parent not in keep:
            publish.remove(record.parent)


def _run_local(folder: Path, spec: StudySpec, pending: Sequence[Job], progress: bool) -> None:
    from tqdm.auto import tqdm

    if not pending:  # nothing to run (all done, or --aggregate-only): no bar claiming every job
        return
    done = len(spec.jobs) - len(pending)
    bar = tqdm(total=len(spec.jobs), initial=done, desc="study", unit="job", disable=not progress)
    try:
        for job in pending:
            bar.set_postfix_str(job.id, refresh=True)
            record = _run_job(folder, job)
            if record.get("status") == "failed":
                bar.write(f"subspace-sweep study: job {job.id} failed at {record['failed_step']}: {record['error']}")
            bar.update(1)
    finally:
        bar.close()


def _check_submitit(executor: str) -> None:
    import importlib.util
    import shutil

    if importlib.util.find_spec("submitit") is None:
        raise InputError(f"--executor {executor} needs submitit: pip install 'subspace-sweep[cluster]'")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise InputError("--executor slurm: no sbatch on this machine's PATH (run the study from a SLURM login node, "
                         "or use --executor local)")


def _run_submitit(folder: Path, spec: StudySpec, pending: Sequence[Job], executor: str, progress: bool) -> None:
    """One submitit job array over the pending jobs; wait for them with a progress bar. A worker
    that dies without a result (killed, out of memory, out of time) is recorded as failed here."""
    import submitit
    from tqdm.auto import tqdm

    if not pending:
        return
    s = dict(spec.slurm)
    ex = submitit.AutoExecutor(folder=str(folder / "logs" / "%j"), cluster="local" if executor == "submitit-local" else "slurm")
    params: dict = {"timeout_min": int(s.get("time_min", 240)), "name": "subspace-sweep-study"}
    for key, name in (("gpus_per_node", "gpus_per_node"), ("cpus_per_task", "cpus_per_task"), ("mem_gb", "mem_gb")):
        if key in s:
            params[name] = s[key]
    if executor == "slurm":
        for key in ("partition", "array_parallelism", "account", "qos", "constraint"):
            if key in s:
                params[f"slurm_{key}"] = s[key]
    ex.update_parameters(**params)
    workers = ex.map_array(run_job, [str(folder)] * len(pending), [j.id for j in pending])
    done = len(spec.jobs) - len(pending)
    bar = tqdm(total=len(spec.jobs), initial=done, desc=f"study ({executor})", unit="job", disable=not progress)
    try:
        left = dict(zip((j.id for j in pending), workers))
        while left:
            for job_id, worker in list(left.items()):
                if worker.done():
                    del left[job_id]
                    bar.update(1)
                    _collect(folder, spec.job(job_id), worker, bar)
            if left:
                time.sleep(1.0)
    except BaseException:
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.cancel(check=False)
        raise
    finally:
        bar.close()


def _collect(folder: Path, job: Job, worker, bar) -> None:
    try:
        record = worker.result()
    except Exception as e:
        paths = job_paths(folder, job)
        record = read_record(paths) or {"format": STUDY_FORMAT, "job": job.id, "job_hash": job.hash, "steps": {}}
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        record.update(status="failed", failed_step=record.get("failed_step") or "worker",
                      error=f"the worker ended without a result ({first[:300]})")
        _write_record(paths, record)
    if record.get("status") == "failed":
        bar.write(f"subspace-sweep study: job {job.id} failed at {record['failed_step']}: {record['error']}")


# ------------------------------------------------------------------------------- the aggregate


def merged_results(inputs: Sequence[str | os.PathLike], spec: StudySpec) -> dict[str, tuple[dict, list[dict]]]:
    """``--merge``: job id -> (row, gains) from other aggregates' inputs.json (a study split over
    machines that share no file system). A row joins only as the job of this spec it claims to be
    (its job hash: model, family, seed, settings, behaviour); its outputs are not here to verify,
    so the row keeps ``merged_from`` (the sha256 of the file it came from) and the conclusion counts
    them. InputError naming the file for anything else."""
    hashes = {j.id: j.hash for j in spec.jobs}
    out: dict[str, tuple[dict, list[dict]]] = {}
    for path in inputs:
        where = f"--merge {path}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: not a study aggregate's inputs.json ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise InputError(f"{where}: not a study aggregate's inputs.json (no rows)")
        sha = _file_sha256(Path(path))
        for row in data["rows"]:
            job = row.get("job") if isinstance(row, dict) else None
            if job not in hashes:
                raise InputError(f"{where}: job {job!r} is not a job of this spec")
            if row.get("job_hash") != hashes[job]:
                raise InputError(f"{where}: job {job} was made with other settings or data than this spec's "
                                 "(its job hash differs)")
            if row.get("view") not in ("residual", "standardized"):  # SPEC §12: which view its numbers are in
                raise InputError(f"{where}: job {job} does not say which view its numbers are read in (an aggregate "
                                 "written before that was kept: rerun `study --aggregate-only` where its jobs are)")
            gains = [g for g in data.get("gains") or [] if isinstance(g, dict) and g.get("job") == job]
            if not gains:
                raise InputError(f"{where}: no per-job gains for {job} (an aggregate written before they were kept)")
            out.setdefault(job, ({**row, "merged_from": row.get("merged_from") or sha}, gains))
    return out


def write_study_aggregate(folder: Path, spec: StudySpec,
                          merged: Mapping[str, tuple[dict, list[dict]]] | None = None) -> Path:
    """``DIR/study/`` from the finished jobs, published whole (replacing the previous aggregate);
    a job not finished here is taken from ``merged`` (``merged_results``: job id -> row, gains)."""
    from . import html_report, publish
    from .provenance import package_versions
    from .study_aggregate import aggregate, job_results, write_aggregate

    merged = merged or {}
    rows, gains, failed = [], [], []
    for job in spec.jobs:
        paths = job_paths(folder, job)
        state = job_state(job, paths)
        if state != "done" and job.id in merged:
            rows.append(merged[job.id][0])
            gains += merged[job.id][1]
            continue
        if state != "done":
            record = read_record(paths) or {}
            failed.append({"job": job.id, "step": record.get("failed_step") or "-",
                           "error": record.get("error") or f"not finished ({state})",
                           "status": "failed" if state.startswith("failed") else "not finished"})
            continue
        numbers, job_gains = job_results(paths.run)
        delta_sha = (read_record(paths) or {}).get("steps", {}).get("delta", {}).get("files", {}).get(paths.delta.name)
        rows.append({"model": job.slug, "family": job.family, "seed": job.seed, "job": job.id,
                     "job_hash": job.hash, "delta_sha256": delta_sha, **numbers})
        gains += [{"model": job.slug, "family": job.family, "job": job.id, **g} for g in job_gains]
    agg = aggregate(rows, gains, failed)
    merged_from = {r["job"]: r["merged_from"] for r in rows if r.get("merged_from")}
    manifest = {"kind": "study", "format": STUDY_FORMAT, "spec": spec.spec,
                "package_versions": package_versions(), "jobs": [j.id for j in spec.jobs],
                "finished": [r["job"] for r in rows], "interval": "95% Student-t over seeds (mean ± t·sd/√n)",
                **({"merged": merged_from} if merged_from else {})}
    dest = folder / AGGREGATE
    inputs = {"rows": rows, "gains": gains, "failed": failed}
    def fill(tmp: Path) -> None:
        write_aggregate(agg, tmp, manifest, len(spec.jobs), inputs)
        html_report.write_into(tmp, kind="study", manifest=manifest)  # links each job's run report

    return publish.write_folder(dest, fill, overwrite=True, snapshot=None)
