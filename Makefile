# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   set up, then build the digits pipeline end to end with `dvc repro` (offline)
#   make test   set up, then run the whole test suite
#   make check  the tests that start no Ray, DVC or test hosts: the edit loop (docs/testing.md)
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
# Ray would package the working directory (data/ included) for every `uv run` driver.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0
export WANDB_SILENT := true

.PHONY: help setup browser demo test check lint format clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(UV):
	@echo "uv not found: installing it for this user with pip"
	$(PYTHON) -m pip install --user --quiet uv || $(PYTHON) -m pip install --user --quiet --break-system-packages uv

# --compile-bytecode: every Ray worker and pipeline stage is a fresh Python process, and where
# bytecode is not written back (PYTHONDONTWRITEBYTECODE, read-only environments) each one would
# recompile torch's and Ray's sources: 12.5 s -> 5.4 s to import the training loop, 2 cores.
.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

setup: .venv/.synced  ## create .venv from uv.lock (exact, reproducible versions)

demo: setup  ## run the digits pipeline end to end (dvc repro), then show its metrics
	$(UV) run --frozen dvc repro
	$(UV) run --frozen dvc metrics show

# The report test opens reports/<name>/index.html in headless Chromium. Best effort: where it
# cannot be installed (not root, no apt-get, no network) that test is skipped and says why.
browser:  ## install Chromium (Debian's apt package) for the report test, if missing
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	   || command -v google-chrome >/dev/null 2>&1; then \
	  echo "browser: Chromium found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: installing chromium with apt-get (for the report test)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    >/tmp/attnpipe-browser-install.log 2>&1 \
	    && echo "browser: chromium installed" \
	    || echo "browser: could not install chromium (see /tmp/attnpipe-browser-install.log);" \
	            "the report browser test will be skipped"; \
	else \
	  echo "browser: no Chromium and no root apt-get; the report browser test will be skipped"; \
	fi

# The unmarked tests run in-process, one thread each: two processes use both cores (-n 2), each
# given whole work units (tests/conftest.py: a file's tests, so that its module fixtures are
# built once), longest first.
QUICK_TESTS := -m "not (ray or dvc or netns)" -n 2 --dist loadgroup

# Every test. The tiers that start Ray, DVC and test hosts run one test at a time: each keeps
# the cores busy while it computes, and two at a time measured no faster (load 6,
# docs/testing.md). But they leave about a third of the two cores idle while Ray and DVC start
# processes and wait on them, and the quick tier runs beside them in those gaps at idle
# priority (SCHED_IDLE: it gets a core only when they leave one free; `nice`, even 10, slowed
# them 2-3 times: Ray's processes wait on each other's messages, and each wait grew). So that a
# quick test starved for minutes is not taken for a hung one, its timeout there is 3000 s; the
# tests that wait on the wall clock (marker `timing`) run in the foreground instead. The quick
# tier's output is shown after theirs; the status is the first failure's.
BESIDE := $(shell chrt --idle 0 true 2>/dev/null && echo "chrt --idle 0" || echo "nice -n 19")
BESIDE_TESTS := -m "not (ray or dvc or netns or timing)" -n 2 --dist loadgroup --timeout=3000
test: setup browser  ## run the whole test suite (tiny data; starts real Ray, DVC and W&B offline)
	@quick_log=$$(mktemp -t attnpipe-quick-tier.XXXXXX); status=0; \
	echo "make test: the quick tier runs beside the marked tiers ($(BESIDE)); its output follows theirs"; \
	$(BESIDE) $(UV) run --frozen pytest $(BESIDE_TESTS) > $$quick_log 2>&1 & quick=$$!; \
	$(UV) run --frozen pytest -m "ray or dvc or netns or timing" || status=$$?; \
	wait $$quick || { code=$$?; [ $$status != 0 ] || status=$$code; }; \
	echo '----- the quick tier: pytest $(BESIDE_TESTS) -----'; \
	cat $$quick_log; rm -f $$quick_log; \
	exit $$status

check: setup  ## the tests that need no Ray, DVC repository or test hosts (minutes; docs/testing.md)
	$(UV) run --frozen pytest $(QUICK_TESTS)

lint: setup  ## ruff: lint and format check
	$(UV) run --frozen ruff check src tests benchmarks
	$(UV) run --frozen ruff format --check src tests benchmarks

format: setup  ## ruff: fix what can be fixed and format
	$(UV) run --frozen ruff check --fix src tests benchmarks
	$(UV) run --frozen ruff format src tests benchmarks

clean:  ## remove generated data, models and reports (not the DVC cache)
	rm -rf data models reports wandb
