# `make test` and `make demo` work on a fresh machine: they create .venv,
# install the pinned requirements (a no-op when already satisfied) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when requirements.txt changes.
$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

# The CI suite: everything except tests marked slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Everything, slow tests included.
test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/vision_crops.py
	$(PY) bench/attention.py

clean:
	rm -rf $(VENV)
