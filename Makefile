# Two commands do all the set-up on a fresh machine (Python 3.11 required):
#   make serve   - installs into .venv and runs the service on its embedded default (SQLite, local storage)
#   make test    - installs into .venv and runs the whole suite with lint, types and the secret scan
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: serve test install lint lock

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/comfyfleet serve

test: install
	$(BIN)/python -m scripts.check
