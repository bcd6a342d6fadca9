"""One report over evaluation runs: score tables and image grids, as Markdown and HTML.

    python -m eval.report runs/geneval/tiny_vq_heldout runs/mmbench/tiny_und --out runs/report
    # -> runs/report/report.md (any Markdown viewer) and runs/report/report.html (any browser),
    #    grids in runs/report/grids/

Each argument is an output folder of ``python -m eval.geneval generate`` (scored with
``eval.geneval score``; an unscored shapes-world folder is scored here) or of
``python -m eval.mmbench run``. Several runs of one kind get one comparison table (a column per
run), then per-run details: for GenEval a grid of a few prompts per task (every sample of the
prompt in a row, each marked right or wrong by the scorer, with its reason); for MMBench the
vanilla and circular accuracy per category and the unparsed answers.
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)  # Markdown


def kind_of(run: Path) -> str:
    if (run / "predictions.jsonl").is_file():
        return "mmbench"
    if any(run.glob("*/metadata.jsonl")):
        return "geneval"
    raise ValueError(f"{run} is neither a GenEval output folder (*/metadata.jsonl) nor an MMBench one "
                     f"(predictions.jsonl)")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


# ---------------------------------------------------------------- GenEval

def geneval_summary(run: Path) -> tuple[dict | None, list[dict]]:
    """(summary, results) of a GenEval folder, scoring a shapes-world folder that has none yet.
    COCO folders without the official evaluator's results give (None, [])."""
    from eval.geneval import NeedsOfficialEvaluator, score_folder

    if not (run / "summary.json").is_file() or not (run / "results.jsonl").is_file():
        try:
            score_folder(run, log=lambda s: None)
        except NeedsOfficialEvaluator:  # classes the shapes detector does not know (COCO)
            return None, []
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run / "summary.json").read_text()), results


def geneval_grid(run: Path, results: list[dict], tag: str, k: int, dest: Path, scale: int = 3) -> tuple[Path, list[str]]:
    """A grid of the first ``k`` prompts of ``tag``: one row per prompt, its samples side by side
    with a green (right) or red (wrong) frame. Returns the file and one caption per row."""
    by_folder: dict[Path, list[dict]] = {}
    for r in results:
        if r["tag"] == tag:
            by_folder.setdefault(Path(r["filename"]).parent.parent, []).append(r)
    folders = sorted(by_folder)[:k]
    rows = [sorted(by_folder[f], key=lambda r: r["filename"]) for f in folders]
    images = [[Image.open(_resolve(run, r["filename"])).convert("RGB") for r in row] for row in rows]
    w, h = images[0][0].size
    cell_w, cell_h, pad = w * scale + 4, h * scale + 4, 2
    cols = max(len(r) for r in images)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, len(images) * (cell_h + pad) + pad), (30, 30, 30))
    draw = ImageDraw.Draw(grid)
    for i, (row, imgs) in enumerate(zip(rows, images)):
        for j, (r, im) in enumerate(zip(row, imgs)):
            x, y = pad + j * (cell_w + pad), pad + i * (cell_h + pad)
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=(40, 170, 60) if r["correct"] else (200, 50, 50))
            grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (x + 2, y + 2))
    dest.parent.mkdir(parents=True, exist_ok=True)
    grid.save(dest)
    captions = [f"{row[0]['prompt']} ({sum(r['correct'] for r in row)}/{len(row)} right"
                + (f"; e.g. {next(r['reason'] for r in row if not r['correct']).replace(chr(10), '; ')}"
                   if not all(r["correct"] for r in row)
                   else "") + ")" for row in rows]
    return dest, captions


def _resolve(run: Path, filename: str) -> Path:
    p = Path(filename)
    if p.is_file():
        return p
    parts = p.parts  # written on another machine: keep "<idx>/samples/<n>.png"
    return run / Path(*parts[-3:])


def geneval_sections(runs: list[Path], out: Path, k: int) -> list[Section]:
    scored = {run: geneval_summary(run) for run in runs}
    tasks: list[str] = []
    for summary, _ in scored.values():
        for t in (summary or {}).get("tasks", {}):
            if t not in tasks:
                tasks.append(t)
    head = Section("GenEval", ["Per-task accuracy over images (%), overall = unweighted mean of the tasks "
                               "(GenEval's summary_scores.py).", ""])
    rows = [[t] + [pct(s["tasks"][t]["accuracy"]) if s and t in s["tasks"] else "-" for s, _ in scored.values()]
            for t in tasks]
    rows.append(["**overall**"] + [f"**{pct(s['overall'])}**" if s else "not scored" for s, _ in scored.values()])
    rows.append(["images"] + [str(s["total_images"]) if s else "-" for s, _ in scored.values()])
    head.lines += table(["task"] + [r.name for r in runs], rows)
    sections = [head]
    for run, (summary, results) in scored.items():
        sec = Section(f"GenEval: {run.name}", [f"`{run}`", ""])
        settings = _settings(run)
        if settings:
            sec.lines += [f"Settings: {settings}", ""]
        if summary is None:
            sec.lines.append("Not scored: the metadata names classes the shapes detector does not know; score "
                             "it with GenEval's official evaluator (see `python -m eval.geneval --help`).")
            sections.append(sec)
            continue
        for tag in summary["tasks"]:
            path, captions = geneval_grid(run, results, tag, k, out / "grids" / f"{run.name}_{tag}.png")
            sec.lines += [f"**{tag}**: {pct(summary['tasks'][tag]['accuracy'])}%", "",
                          f"![{tag}]({path.relative_to(out).as_posix()})", ""]
            sec.lines += [f"{i + 1}. {' '.join(c.split())}" for i, c in enumerate(captions)] + [""]
        sections.append(sec)
    return sections


def _settings(run: Path) -> str:
    f = run / "run.json"
    if not f.is_file():
        return ""
    s = json.loads(f.read_text())
    s = s.get("settings", s)
    keep = ("n_samples", "steps", "guidance_scale", "cfg", "seed", "dtype", "template", "max_new_tokens")
    return ", ".join(f"{k}={s[k]}" for k in keep if k in s)


# ---------------------------------------------------------------- MMBench

def mmbench_sections(runs: list[Path]) -> list[Section]:
    from eval.mmbench import write_summary

    summaries = {}
    for run in runs:
        summaries[run] = (json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file()
                          else write_summary(run))
    head = Section("MMBench", ["Accuracy (%): vanilla (rotation 0 alone) / CircularEval (every rotation "
                               "right).", ""])
    cats: list[str] = []
    for s in summaries.values():
        cats += [c for c in s.get("category", {}) if c not in cats]

    def cell(d: dict | None) -> str:
        return "-" if not d or not d.get("n") else f"{pct(d['vanilla'])} / {pct(d['circular'])}"

    rows = [["**overall**"] + [f"**{cell(s['overall'])}**" for s in summaries.values()]]
    rows += [[c] + [cell(s.get("category", {}).get(c)) for s in summaries.values()] for c in cats]
    rows.append(["questions"] + [str(s["overall"].get("n", 0)) for s in summaries.values()])
    head.lines += table(["category"] + [r.name for r in runs], rows)
    sections = [head]
    for run, s in summaries.items():
        sec = Section(f"MMBench: {run.name}", [f"`{run}`", ""])
        settings = _settings(run)
        if settings:
            sec.lines += [f"Settings: {settings}", ""]
        l2 = s.get("l2-category", {})
        if l2:
            sec.lines += table(["l2-category", "n", "vanilla", "circular"],
                               [[k, str(v["n"]), pct(v["vanilla"]), pct(v["circular"])] for k, v in l2.items()]) + [""]
        unparsed = s.get("unparsed", [])
        sec.lines.append(f"Unparsed answers: {len(unparsed)} of {s.get('rows', '?')} rows (counted wrong).")
        sections.append(sec)
    return sections


# ---------------------------------------------------------------- training curves

# What each stage's log.jsonl is plotted as: panels of (title, keys); keys missing from a log are skipped.
CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "vq": [("reconstruction MSE (train batches)", ["recon_mse"]),
           ("held-out PSNR (dB)", ["heldout_psnr"]),
           ("held-out codebook use, detector accuracy of reconstructions",
            ["heldout_codebook_used", "heldout_detect_accuracy"])],
    "siglip": [("sigmoid loss", ["loss"]),
               ("zero-shot top-1", ["heldout_i2t_top1", "heldout_t2i_top1", "train_i2t_top1", "train_t2i_top1"])],
    "hybrid": [("text loss", ["text_loss"]), ("image loss", ["image_loss"]),
               ("periodic checks", ["sample_accuracy_train", "sample_accuracy_heldout",
                                    "answer_accuracy_train", "answer_accuracy_heldout"]),
               ("clutter guard (share of samples)", ["sample_strict_train", "sample_extra_train",
                                                     "sample_noisy_train", "sample_empty_train"]),
               ("image reliance: caption loss, own vs another image", ["reliance_own_train", "reliance_shuffled_train",
                                                                      "reliance_gap_train", "reliance_gap_heldout"])],
}


def read_log(path: Path) -> list[dict]:
    """The records of a stage's log.jsonl (skipped-step records included; a torn last line ignored)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(log: Path, panels: list[tuple[str, list[str]]], dest: Path, title: str) -> Path | None:
    """One PNG with a panel per (title, keys) against the training step; None if nothing to plot."""
    rows = read_log(log)
    return plot_panels([(t, [(k, log_points(rows, k)) for k in keys]) for t, keys in panels], dest, title)


def log_points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of the log records where ``key`` holds a number."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def plot_panels(panels: list[tuple[str, list[tuple[str, list[tuple[int, float]]]]]], dest: Path,
                title: str | None = None, log_y: bool = False) -> Path | None:
    """One PNG with a panel per ``(title, [(label, points), ...])``, each line ``(step, value)``
    points; empty lines and panels are left out; None (and no file) if nothing is left."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    series = [(t, [(k, pts) for k, pts in ks if pts]) for t, ks in panels]
    series = [(t, ks) for t, ks in series if ks]
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (t, ks) in zip(axes[0], series):
        for k, pts in ks:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=k)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(ks) > 1:
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, dest)


def save_figure(fig, dest: Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns ``dest``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=dpi)
    plt.close(fig)
    return dest


# ---------------------------------------------------------------- the recipe's report

RECIPE_METRICS = (("geneval_overall", "GenEval overall"), ("geneval_single_object", "GenEval single_object"),
                  ("mmbench_circular", "MMBench CircularEval"))


def build_recipe_report(out: Path, scores: dict, targets: dict, times: dict[str, float],
                        commands: list[list[str]]) -> Path:
    """The report of ``python -m train.recipe``: scores against the targets, stage times, loss
    curves of every stage, the hybrid run's last training samples, then the evaluation report."""
    import shlex
    import shutil

    rep = out / "report"
    summary = Section("Summary", ["Shapes-world scores of this run against the targets (training compositions / "
                                  "held-out compositions; held-out = colour-shape pairs never seen in training).", ""])
    rows = []
    for key, label in RECIPE_METRICS:
        got = [scores.get(f"{key}_{s}") for s in ("train", "heldout")]
        met = "yes" if got[0] is not None and got[0] >= targets[key] else "no"
        rows.append([label, f"{targets[key]:.2f}", *("-" if g is None else f"{g:.3f}" for g in got), met])
    summary.lines += table(["metric", "target", "training compositions", "held-out", "target met"], rows)
    summary.lines += ["", "Stage wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), ""]
    curves = Section("Training curves", [])
    for stage in ("vq", "siglip", "hybrid"):
        log = out / stage / "log.jsonl"
        if log.is_file():
            png = plot_curves(log, CURVES[stage], rep / "curves" / f"{stage}.png", f"{stage} ({log})")
            if png is not None:
                curves.lines += [f"![{stage}]({png.relative_to(rep).as_posix()})", ""]
    samples = sorted((out / "hybrid" / "samples").glob("step_*.png"))
    if samples:
        rep.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples[-1], rep / "training_samples.png")
        prompts = samples[-1].with_suffix(".txt")
        curves.lines += [f"Samples at the end of training ({samples[-1].name}; prompts in order, left to right, "
                         "top to bottom):", "", "![samples](training_samples.png)", ""]
        if prompts.is_file():
            curves.lines += [f"{line}" for line in prompts.read_text().splitlines()] + [""]
    cmds = Section("Commands", ["What the recipe ran, in order:", ""] + [f"`{shlex.join(c)}`" for c in commands])
    instruments = instruments_section(out)
    runs = [p for p in (out / "eval" / f"{kind}_{split}" for kind in ("geneval", "mmbench")
                        for split in ("train", "heldout")) if p.is_dir()]
    return build_report(runs, rep, title=f"hybrid recipe: {out}", preface=[summary, instruments, curves],
                        epilogue=[cmds])


def instruments_section(out: Path) -> Section:
    """What shows whether the model learned to see and to draw: the clutter guard of the GenEval
    runs, image reliance (first and last sampling step of training, and the final model), and the
    linear probes of the encoder and of the model's hidden states (``train.probes``)."""
    sec = Section("Learning instruments", [])
    rows = []
    for split in ("train", "heldout"):
        f = out / "eval" / f"geneval_{split}" / "summary.json"
        if f.is_file():
            s = json.loads(f.read_text())
            if "strict_overall" in s:
                rows.append([split, f"{s['overall']:.3f}", f"{s['strict_overall']:.3f}", f"{s['extra_share']:.2f}",
                             f"{s['empty_share']:.2f}", f"{s['noisy_share']:.2f}"])
    if rows:
        sec.lines += ["GenEval with the clutter guard (strict = right *and* on a clean canvas: no more objects than "
                      "prompted, no stray foreground), shares of images:", ""]
        sec.lines += table(["compositions", "GenEval overall", "strict overall", "more objects than prompted",
                            "empty", "noisy"], rows) + [""]
    log = out / "hybrid" / "log.jsonl"
    checks = [r for r in read_log(log) if "reliance_gap_train" in r] if log.is_file() else []
    probes_file = out / "eval" / "probes.json"
    probes = json.loads(probes_file.read_text()) if probes_file.is_file() else {}
    if checks or probes:
        sec.lines += ["Image reliance: the caption text loss with each image's own understanding features vs another "
                      "image's (a gap near 0 = the model ignores the image):", ""]
        rows = [[f"training step {r['step']}", *(f"{r.get(f'reliance_{k}_{s}', float('nan')):.3f}"
                                                 for s in ("train", "heldout") for k in ("own", "shuffled", "gap"))]
                for r in (checks[:1] + checks[-1:] if len(checks) > 1 else checks)]
        if "reliance_train" in probes:
            rows.append(["final model (128 captions)", *(f"{probes[f'reliance_{s}'][k]:.3f}"
                                                         for s in ("train", "heldout") for k in ("own", "shuffled", "gap"))])
        sec.lines += table(["when", "own (train)", "shuffled (train)", "gap (train)", "own (held-out)",
                            "shuffled (held-out)", "gap (held-out)"], rows) + [""]
    if "caption_reliance" in probes:
        sec.lines += ["Caption reliance (generation): the image loss with each image's own caption vs another's vs "
                      "none, by noise level (a gap near 0 = the model draws without reading its prompt):", ""]
        sec.lines += table(["noise level", "own caption", "another's", "none", "gap"],
                           [[k.removeprefix("sigma_"), *(f"{v[f]:.4f}" for f in ("own", "shuffled", "none", "gap"))]
                            for k, v in probes["caption_reliance"].items()]) + [""]
    feats = [k for k in ("pixels", "encoder", "hybrid_middle", "hybrid_last") if k in probes]
    if feats:
        tasks = ("color", "shape", "count", "x_position", "y_position")
        sec.lines += ["Linear probes (train compositions / held-out compositions; chance in the last row):", ""]
        rows = [[k, *(f"{probes[k][f'train/{t}']:.2f} / {probes[k][f'heldout/{t}']:.2f}" for t in tasks)] for k in feats]
        rows.append(["chance", *(f"{probes[feats[0]][f'chance/{t}']:.2f}" for t in tasks)])
        sec.lines += table(["features", *tasks], rows) + [""]
    if not sec.lines:
        sec.lines = ["(no instruments recorded for this run)"]
    return sec


# ---------------------------------------------------------------- output

def to_markdown(sections: list[Section], title: str) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", "", *s.lines, ""]
    return "\n".join(out)


def to_html(sections: list[Section], title: str) -> str:
    """The same report for a browser: our Markdown subset (headings, tables, images, lists)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        in_table = False
        for line in s.lines:
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if all(set(c) <= {"-"} for c in cells):
                    continue
                if not in_table:
                    body.append("<table>")
                    in_table, tag = True, "th"
                else:
                    tag = "td"
                body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
                continue
            if in_table:
                body.append("</table>")
                in_table = False
            if line.startswith("!["):
                alt, src = line[2:].split("](")
                body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
            elif line:
                body.append(f"<p>{_inline(line)}</p>")
        if in_table:
            body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{image-rendering:pixelated}")
    return f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>\n" + \
        "\n".join(body) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    parts = text.split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def build_report(runs: list[Path], out: Path, prompts_per_task: int = 3, title: str = "hybrid evaluation",
                 preface: list[Section] | None = None, epilogue: list[Section] | None = None) -> Path:
    """report.md + report.html over evaluation folders, with optional sections before and after."""
    runs = [Path(r) for r in runs]
    missing = [r for r in runs if not r.is_dir()]
    if missing:
        raise FileNotFoundError(f"no such run folder: {', '.join(map(str, missing))}")
    kinds = {r: kind_of(r) for r in runs}
    out.mkdir(parents=True, exist_ok=True)
    sections = list(preface or [])
    gen = [r for r in runs if kinds[r] == "geneval"]
    mmb = [r for r in runs if kinds[r] == "mmbench"]
    if gen:
        sections += geneval_sections(gen, out, prompts_per_task)
    if mmb:
        sections += mmbench_sections(mmb)
    sections += epilogue or []
    (out / "report.md").write_text(to_markdown(sections, title))
    (out / "report.html").write_text(to_html(sections, title))
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="eval.geneval / eval.mmbench output folders")
    ap.add_argument("--out", type=Path, default=Path("report"), help="report folder (default: ./report)")
    ap.add_argument("--prompts-per-task", type=int, default=3)
    ap.add_argument("--title", default="hybrid evaluation")
    a = ap.parse_args(argv)
    try:
        path = build_report(a.runs, a.out, a.prompts_per_task, a.title)
    except (FileNotFoundError, ValueError) as e:
        ap.exit(2, f"eval.report: error: {e}\n")
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
