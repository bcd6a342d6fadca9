# Two commands for a fresh machine:
#   make demo   create .venv, run the default recipe (python -m train.recipe): VQ tokenizer ->
#               SigLIP -> hybrid model on the shapes world -> GenEval + MMBench -> runs/recipe/report/
#   make test   create .venv, run the test suite
# and: make tiny    (the `tiny` preset alone, pixel-space diffusion, ~15 min)
#      make visual  (VQ + SigLIP stages, then the hybrid model on them with both generation heads)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo tiny visual test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m train.recipe $(ARGS)

tiny: $(STAMP)
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
