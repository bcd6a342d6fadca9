"""Train a stage: the VQ tokenizer, a small SigLIP, or the hybrid model (the YAML's ``stage``).

    python -m train train/configs/vq.yaml        # stage: vq      -> runs/vq/final
    python -m train train/configs/siglip.yaml    # stage: siglip  -> runs/siglip/final
    python -m train train/configs/tiny.yaml      # stage: hybrid  -> runs/tiny/final

CPU (the embedded default, a few minutes on 2 cores):
    python -m train train/configs/tiny.yaml
    python -m train train/configs/debug.yaml steps=20 output_dir=runs/dbg    # seconds
GPUs / several processes:
    accelerate launch -m train train/configs/tiny.yaml mixed_precision=bf16 model.attn_impl=flex
    accelerate launch --num_processes 8 -m train <config.yaml> [key=value ...]

Overrides are ``key=value`` (YAML scalars) or ``model.<field>=value``; unknown keys are errors.
A rerun with the same output_dir resumes from its newest checkpoint (``resume=none`` starts over).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from train.config import read_raw

# stage name -> module with ``load_config(path, overrides)`` and ``train(cfg) -> Path``
STAGES = {"hybrid": "train.trainer", "vq": "train.vq_stage", "siglip": "train.siglip_stage"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML training config, e.g. train/configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value or model.<field>=value")
    args = parser.parse_args(argv)
    try:
        stage = read_raw(args.config, args.overrides).get("stage", "hybrid")
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
        module = importlib.import_module(STAGES[stage])
        cfg = module.load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.trainer import NonFiniteError

    try:
        final = module.train(cfg)
    except NonFiniteError as e:  # the run stopped itself; its last good checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"done: model exported to {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
