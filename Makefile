# Two commands for a fresh machine:
#   make demo   create .venv, train the `tiny` preset on the shapes world, write sample images
#   make test   create .venv, run the test suite
# and: make visual  (VQ + SigLIP stages, then the hybrid model on them with both generation heads)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo visual test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m train train/configs/tiny.yaml $(ARGS)
	@echo "sample images: <output_dir>/samples/ (runs/tiny by default; prompts in the .txt beside each .png)"

# The decoupled visual paths: VQ tokenizer and SigLIP stages, then both generation heads on them.
visual: $(STAMP)
	$(BIN)/python -m train train/configs/vq.yaml
	$(BIN)/python -m train train/configs/siglip.yaml
	$(BIN)/python -m train train/configs/tiny_vq.yaml $(ARGS)
	$(BIN)/python -m train train/configs/tiny_ar.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf runs .pytest_cache
