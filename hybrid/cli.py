"""The ``hybrid`` command: generate images, chat about images, and inspect checkpoints.

    hybrid generate "a photo of a red circle" -o out.png --steps 25 --cfg 3 --seed 0
    hybrid generate "a photo of two blue squares" -o sq.png --num-images 4     # sq_0.png ... sq_3.png
    hybrid generate "the same, but green" -o g.png --image sq_0.png             # input image in the prompt
    hybrid chat --image out.png "What is in the picture?" --max-new-tokens 32
    hybrid interleave "Here is a picture." -o story/                             # story/image_0.png ...
    hybrid info runs/recipe/hybrid/final

Every command takes ``--model DIR`` (default: $HYBRID_MODEL, else runs/recipe/hybrid/final, which
``make demo`` writes), ``--device`` (default cuda when available) and ``--dtype``. Errors from the
pipeline (missing files, bad arguments) print ``hybrid: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybrid.pipeline import DTYPES, HybridPipeline

DEFAULT_MODEL = "runs/recipe/hybrid/final"  # where `make demo` (python -m train.recipe) puts its model
DTYPES = ("auto", "fp32", "bf16", "fp16")

EPILOG = """examples:
  hybrid generate "a photo of a red circle" -o out.png --seed 0
  hybrid generate "a photo of two blue squares" -o sq.png --num-images 4 --steps 50 --cfg 4
  hybrid chat --image out.png "What is in the picture?"
  hybrid interleave "Here is a picture." -o story/
  hybrid info runs/recipe/hybrid/final

The model folder comes from --model, else $HYBRID_MODEL, else runs/recipe/hybrid/final (make demo).
`hybrid COMMAND --help` lists a command's options."""

EXAMPLES = {
    "generate": """examples:
  hybrid generate "a photo of a red circle" -o out.png --seed 0
  hybrid generate "a photo of two blue squares" -o sq.png --num-images 4   # sq_0.png ... sq_3.png
  hybrid generate "a red circle" -o c.png --scheduler ddpm --steps 100      # another sampler
  hybrid generate "the same, but green" -o g.png --image sq_0.png           # image in the prompt""",
    "chat": """examples:
  hybrid chat --image out.png "What is in the picture?"
  hybrid chat --image a.png --image b.png "Which one is red?" --max-new-tokens 16
  hybrid chat "a photo of" --temperature 0.8 --top-p 0.9 --seed 1 --stop .""",
    "interleave": """examples:
  hybrid interleave "Here is a picture." -o story/
  hybrid interleave "Here is a picture." -o story/ --max-images 2 --steps 50 --seed 3""",
    "info": """examples:
  hybrid info runs/recipe/hybrid/final
  hybrid info                   # the default model ($HYBRID_MODEL or runs/recipe/hybrid/final)""",
}


class CLIError(Exception):
    """A user-facing error: printed as ``hybrid: error: ...`` without a traceback."""


# ---------------------------------------------------------------- argument parsing
def _positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative(s: str) -> int:
    n = int(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help=f"pipeline folder (default: $HYBRID_MODEL, else {DEFAULT_MODEL})")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype (auto: bf16 on cuda, fp32 otherwise)")

    parser = argparse.ArgumentParser(
        prog="hybrid", description="Generate images, answer questions about images, and write text with "
        "images in it, with one native multimodal model.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=run)
        return p

    p = add("generate", "Generate images from a text prompt.", cmd_generate)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with --num-images K > 1 the files are "
                   "NAME_0.png ... NAME_{K-1}.png (default: out.png)")
    p.add_argument("--num-images", type=_positive, default=1, metavar="K", help="images to draw (default 1)")
    p.add_argument("--steps", type=_positive, default=25, metavar="N",
                   help="denoising steps (diffusion head; default 25)")
    p.add_argument("--cfg", type=float, default=3.0, metavar="S",
                   help="classifier-free guidance scale, 1 = off (default 3)")
    p.add_argument("--scheduler", choices=("ddpm", "flow"), help="sampler (default: the one saved with the model)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="code sampling temperature (ar head; default 1)")
    p.add_argument("--top-k", type=_positive, metavar="K", help="sample codes from the K most likely only (ar head)")
    p.add_argument("--image", action="append", default=[], metavar="IN.png",
                   help="input image placed before the prompt (repeatable)")
    p.add_argument("--seed", type=int, metavar="N", help="image i uses seed+i (default: random, printed)")

    p = add("chat", "Answer a question about images (or continue text), streaming the answer.", cmd_chat)
    p.add_argument("question", help="the question (or text to continue)")
    p.add_argument("--image", action="append", default=[], metavar="IMG", help="input image (repeatable)")
    _text_sampling(p, max_new_tokens=64)
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold")
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop before this string (repeatable)")

    p = add("interleave", "Write text that contains generated images.", cmd_interleave)
    p.add_argument("prompt", help="the start of the text")
    p.add_argument("-o", "--output-dir", default="interleaved", metavar="DIR",
                   help="where image_<i>.png go (default: ./interleaved)")
    _text_sampling(p, max_new_tokens=128)
    p.add_argument("--max-images", type=_non_negative, default=4, metavar="N",
                   help="at most this many images (default 4)")
    p.add_argument("--steps", type=_positive, default=25, metavar="N", help="denoising steps per image (default 25)")
    p.add_argument("--cfg", type=float, default=3.0, metavar="S", help="guidance scale for the images (default 3)")

    p = add("info", "Describe a checkpoint folder (nothing is generated).", cmd_info)
    p.add_argument("checkpoint", nargs="?", help="pipeline folder (default: --model)")
    return parser


def _text_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=max_new_tokens, metavar="N",
                   help=f"(default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=_positive, metavar="K", help="sample from the K most likely tokens only")
    p.add_argument("--seed", type=int, metavar="N", help="seed for sampling (temperature > 0)")


# ---------------------------------------------------------------- loading
def model_dir(arg: str | None) -> Path:
    path = Path(arg or os.environ.get("HYBRID_MODEL") or DEFAULT_MODEL)
    if not path.is_dir():
        hint = "" if arg or os.environ.get("HYBRID_MODEL") else " or run `make demo` to train one there"
        raise CLIError(f"model folder {path} does not exist; pass --model DIR (or set HYBRID_MODEL){hint}")
    return path


def load(args: argparse.Namespace, folder: Path | None = None) -> HybridPipeline:
    import torch

    from hybrid.pipeline import DTYPES, HybridPipeline

    folder = folder or model_dir(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available here; use --device cpu")
    on_cuda = torch.device(device).type == "cuda"
    name = {"auto": "bf16" if on_cuda else "fp32"}.get(args.dtype, args.dtype)
    dtype = DTYPES[name]
    # stderr: stdout carries only results (paths, answers), so it can be piped
    print(f"loading {folder} ({device}, {name})...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    pipe = HybridPipeline.from_pretrained(folder, device=device, dtype=dtype)
    print(f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return pipe


def _seed(seed: int | None) -> int:
    if seed is not None:
        return seed
    # a random seed, shown, so a result one likes can be made again
    seed = random.randrange(2**31)
    print(f"seed: {seed}", file=sys.stderr)
    return seed


# ---------------------------------------------------------------- commands
def output_paths(output: str, n: int) -> list[Path]:
    from PIL import Image

    out = Path(output)
    if not out.suffix:
        out = out.with_suffix(".png")
    if out.suffix.lower() not in Image.registered_extensions():  # fail before the model runs, not after
        raise CLIError(f"-o {output}: unknown image file extension {out.suffix!r} (use .png)")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def cmd_generate(args: argparse.Namespace) -> int:
    paths = output_paths(args.output, args.num_images)
    pipe = load(args)
    result = pipe.generate_image(args.prompt, num_images=args.num_images, num_steps=args.steps,
                                 guidance_scale=args.cfg, scheduler=args.scheduler, seed=_seed(args.seed),
                                 images=args.image, temperature=args.temperature, top_k=args.top_k,
                                 progress=True)  # a bar over denoising steps, or over the "ar" head's codes
    for image, path in zip(result.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    pipe = load(args)
    stream = pipe.stream_text(args.question, images=args.image, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop=args.stop,
                              seed=args.seed)
    # stream_text holds back text a stop string could still cut, so every piece is final
    for pieces in stream:
        sys.stdout.write(pieces[0])
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_interleave(args: argparse.Namespace) -> int:
    pipe = load(args)
    print("writing (text, then each image's denoising)...", file=sys.stderr, flush=True)
    result = pipe.generate_interleaved(args.prompt, max_new_tokens=args.max_new_tokens, max_images=args.max_images,
                                       temperature=args.temperature, top_k=args.top_k, num_steps=args.steps,
                                       guidance_scale=args.cfg, seed=_seed(args.seed), progress=True)
    out = Path(args.output_dir)
    n = 0
    for part in result.parts:
        if isinstance(part, str):
            if part.strip():
                print(part.strip())
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"image_{n}.png"
        part.save(path)
        print(f"[image: {path}]")
        n += 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    folder = model_dir(args.checkpoint or args.model)
    pipe = load(args, folder)
    info = pipe.info()
    n = info.pop("parameters")
    rows = [("folder", str(folder)), ("parameters", f"{n:,} ({n / 1e6:.1f}M)")]
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        rows.append((key, "none" if value is None else str(value)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("components:")
    for entry in sorted(folder.iterdir()):
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        print(f"  {entry.name + ('/' if entry.is_dir() else ''):<24}{_size(size):>10}")
    return 0


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return the code, so main() is callable in-process
        return e.code if isinstance(e.code, int) else 0
    try:
        return args.run(args)
    except (CLIError, OSError, ValueError) as e:  # the user's input, not a bug: no traceback
        sys.stdout.flush()
        print(f"hybrid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
