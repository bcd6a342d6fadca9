"""Train a hybrid model.

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
import sys

from train.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML training config, e.g. train/configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value or model.<field>=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.trainer import train  # heavy imports only after the config is known to be valid

    final = train(cfg)
    print(f"done: model exported to {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
