# Two entry points: `make run` (the built-in demo) and `make test`.
# Both create .venv and install the package into it on a fresh machine (with the extras the
# integration tests need: Lightning and Hugging Face).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lightning,huggingface]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gconv demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
