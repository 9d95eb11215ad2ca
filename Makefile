# The two commands that matter: `make demo` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
SHARED_DATA := $(abspath ../shared/data)
export SIDFORGE_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sidforge data pull amazon-beauty-2014   # verified and skipped when present
	$(VENV)/bin/sidforge pipeline --config configs/demo.yaml
	@echo
	@echo "The report: runs/demo/report.md (plots in runs/demo/report/). Serve the run over HTTP with:"
	@echo "  $(VENV)/bin/sidforge serve runs/demo --config configs/demo.yaml"
	@echo "  curl -s localhost:8000/recommend -H 'content-type: application/json' -d '{\"history\": [1, 2, 3]}'"
	@echo "(adding items through /items/assign needs an API token: README, Security)"

test: $(STAMP)
	$(VENV)/bin/ruff check sidforge tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check sidforge tests bench

clean:
	rm -rf runs .pytest_cache
