# The two commands of the README. Each sets up .venv from nothing when needed.
#   make demo   install, then run the main job (writes out.png)
#   make test   install, then run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a CUDA user sets TORCH_SPEC (see README) or installs torch first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ldmrt-installed
SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: install demo test clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ldmrt demo -o out.png

# k-diffusion itself is a reference of the sampler tests, which read its sampling.py; its declared dependencies
# are training tools (wandb, clean-fid, ...), hence --no-deps (what sampling.py imports is in the test extra).
test: $(STAMP)
	$(PY) -m pip install -q --no-deps 'k-diffusion==0.1.1.post1'
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info ldmrt/_C*.so
