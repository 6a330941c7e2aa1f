# `make run` runs the default grid; `make test` runs the tests. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: run test calibrate pretrain bench clean-results

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]" torch==2.14.1 torchvision==0.29.1
	touch $@

run: $(VENV)/.installed
	$(PY) run_all.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest

clean-results:
	rm -rf results/runs results/splits results/cache results/tables results/figures results/summary.csv results/submitit
