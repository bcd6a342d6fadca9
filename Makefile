# Two commands for a fresh machine:
#   make demo   create .venv, train the `tiny` preset on the shapes world, write sample images
#   make test   create .venv, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m train train/configs/tiny.yaml $(ARGS)
	@echo "sample images: <output_dir>/samples/ (runs/tiny by default; prompts in the .txt beside each .png)"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf runs .pytest_cache
