# brain-tumour-unet: common tasks. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_DIR := runs/latest
HTML_DIR := runs/html
NOTEBOOKS = $(sort $(wildcard notebooks/[0-9]*.ipynb))
VIEWER_PORT ?= 8866
LINT_PATHS := seg_*.py tests benchmarks notebooks

# Every recipe sees these; LGG_DATA and SEG_* pass through from the caller's environment untouched.
# MPLBACKEND=Agg is deliberately NOT exported for everything: ipykernel only selects the inline
# backend when MPLBACKEND is unset, so exporting Agg would strip every figure from the executed
# notebooks (`run`), from Voila (`viewer`) and from `lab`. It is set for the plain pytest run only
# (tests/conftest.py sets it too).
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: help venv data run html test test-modules test-notebooks lab viewer lint browser-deps clean

help:
	@echo "make venv          create/update .venv from requirements.txt (+ editable seg_utils)"
	@echo "make data          resolve the data (LGG_DATA, data/kaggle_3m/ or synthetic) and say where"
	@echo "make run           execute notebooks/[0-9]*.ipynb in order into $(RUN_DIR)/"
	@echo "make html          render the executed notebooks of 'make run' to $(HTML_DIR)/"
	@echo "make test          pytest tests/ and, side by side, the notebooks (nbval, SEG_QUICK=1)"
	@echo "make lab           JupyterLab on notebooks/"
	@echo "make viewer        Voila mask viewer on http://127.0.0.1:$(VIEWER_PORT)/"
	@echo "make lint          ruff check + ruff format --check"
	@echo "make browser-deps  install Debian chromium (root only) for the browser test"
	@echo "make clean         remove runs/"

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q -e . --no-deps
	@# ipykernel inside the venv provides the "python3" kernel; no `ipykernel install` needed.
	@$(VENV)/bin/jupyter kernelspec list | grep '^ *python3 ' >/dev/null \
	  || { echo "error: no python3 Jupyter kernel in $(VENV) (is ipykernel installed?)" >&2; exit 1; }
	@touch $@

data: venv
	$(VENV)/bin/unet-seg data

run: venv data
	@mkdir -p $(RUN_DIR)
	@test -n "$(NOTEBOOKS)" || { echo "error: no notebooks/[0-9]*.ipynb found" >&2; exit 1; }
	@for nb in $(NOTEBOOKS); do \
	  echo "=== $$nb"; \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	    --output-dir $(RUN_DIR) "$$nb" || { echo "FAILED: $$nb (executed copies so far in $(RUN_DIR)/)" >&2; exit 1; }; \
	done
	@echo "Executed notebooks are in $(CURDIR)/$(RUN_DIR)/"

html: venv
	@ls $(RUN_DIR)/[0-9]*.ipynb >/dev/null 2>&1 \
	  || { echo "error: no executed notebooks in $(RUN_DIR)/: run 'make run' first" >&2; exit 1; }
	$(VENV)/bin/jupyter nbconvert --to html --output-dir $(HTML_DIR) $(RUN_DIR)/[0-9]*.ipynb
	@echo "The lessons as HTML, outputs included: $(CURDIR)/$(HTML_DIR)/"

# The two halves of the suite run side by side, one thread each, one per core: a 2-core laptop
# finishes both in the time of the longer. --output-sync prints each half's output whole.
test: venv
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-modules test-notebooks

test-modules: venv
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(PY) -m pytest tests/ -q

test-notebooks: venv
	OMP_NUM_THREADS=1 SEG_QUICK=1 SEG_RUN_DIR=$(CURDIR)/runs/ci $(PY) -m pytest --nbval-lax --nbval-current-env notebooks/ -q

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

viewer: venv
	$(VENV)/bin/voila notebooks/05_where_the_model_is_wrong.ipynb --port=$(VIEWER_PORT) --Voila.ip=127.0.0.1

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

browser-deps:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "chromium already installed: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
	  echo "chromium is missing and this is not root; install it with:"; \
	  echo "  sudo apt-get update && sudo apt-get install -y chromium"; \
	  echo "(the browser test skips without /usr/bin/chromium unless SEG_REQUIRE_BROWSER=1)"; \
	fi

clean:
	rm -rf runs/
