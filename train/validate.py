"""Scan a data source and report every problem with its file and reason.

    python -m train.validate data/manifest.jsonl --image-size 32
    python -m train.validate 'data/shards-{000..003}.tar' --max-pixels 16777216
    python -m train.validate data/hf_folder --columns image=img,text=caption
    python -m train.validate data/manifest.jsonl --tokenizer runs/tok --seq-len 256 \\
        --gen-tokens 16 --und-tokens 16        # also flags samples too long for the context

Prints one line per problem (``path: reason (detail)``), then ``skipped N items: reason=count,
...`` and the number of records; exit status 1 if there was any problem, 0 otherwise, 2 for a
source that cannot be opened at all.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from train.sources import DEFAULT_MAX_CHARS, DEFAULT_MAX_PIXELS, SampleLimit, iter_problems, open_source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="manifest.jsonl, tar shards ('shards-{000..003}.tar', globs) or a datasets folder")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    ap.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS)
    ap.add_argument("--no-convert", action="store_true", help="refuse every non-RGB image")
    ap.add_argument("--columns", default=None, help="datasets folder columns, e.g. image=img,text=caption")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder: flag samples longer than --seq-len")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--gen-tokens", type=int, default=0)
    ap.add_argument("--und-tokens", type=int, default=0)
    args = ap.parse_args(argv)

    kw: dict = {"max_pixels": args.max_pixels, "max_chars": args.max_chars, "convert_modes": not args.no_convert}
    if args.columns:
        pairs = [kv.split("=", 1) for kv in args.columns.split(",")]
        if any(len(p) != 2 or not all(x.strip() for x in p) for p in pairs):
            ap.error(f"--columns expects field=column pairs, e.g. image=img,text=caption; got {args.columns!r}")
        kw["columns"] = {k.strip(): v.strip() for k, v in pairs}
    if args.tokenizer:
        if args.seq_len is None:
            ap.error("--tokenizer needs --seq-len")
        from hybrid.tokenizer import load_tokenizer

        kw["limit"] = SampleLimit(load_tokenizer(args.tokenizer), args.seq_len, args.gen_tokens, args.und_tokens)
    try:
        if "columns" in kw and not Path(args.source).is_dir():
            raise ValueError("--columns applies to a datasets folder only")
        src = open_source(args.source, args.image_size, **kw)
    except (OSError, ValueError, ImportError) as e:
        print(f"cannot open {args.source}: {e}", file=sys.stderr)
        return 2
    counts: Counter[str] = Counter()
    for bad in iter_problems(src):
        print(bad)
        counts[bad.reason] += 1
    total = sum(counts.values())
    detail = ": " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) if counts else ""
    print(f"skipped {total} items{detail} ({src.n_records} records in {args.source})")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
