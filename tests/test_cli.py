"""The ``hybrid`` command line, run in-process on a tiny pipeline folder (and once as the installed script)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybrid.cli import main
from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from hybrid.pipeline import HybridPipeline
from hybrid.tokenizer import special_token_ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A debug-size pipeline with a tiny SigLIP whose next token is fixed by construction:
    " circle" > <boi> > <eos> > everything else, whatever the context. Greedy text is then known
    exactly, and sampled interleaved text holds both words and images."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from encoders.siglip import SiglipEncoder

    torch.manual_seed(0)
    cfg = HybridConfig.from_preset("debug", vocab_size=len(tokenizer), **special_token_ids(tokenizer))
    model = HybridModel(cfg)
    (word,) = tokenizer.encode(" circle", add_special_tokens=False)
    with torch.no_grad():
        # residual channel 0 is +10 at every text token and no block writes to it, so the final
        # normed hidden is (c > 0, 0, ...) and the logits are c * lm_head[:, 0]
        model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.layers:
            layer.attn.o_proj.weight[0] = 0.0
            layer.ffn.down_proj.weight[0] = 0.0
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        prefs = torch.full((cfg.vocab_size,), -1.0)
        prefs[word], prefs[cfg.boi_id], prefs[cfg.eos_id] = 0.3, 0.25, 0.15
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = prefs
        torch.nn.init.normal_(model.image_out.weight, std=0.02)  # zero-init would draw flat images
    tower = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=16, hidden_size=cfg.und_feature_dim,
                                                 intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    siglip = SiglipEncoder.from_transformers_model(tower, SiglipImageProcessor(size={"height": 32, "width": 32}))
    root = tmp_path_factory.mktemp("cli")
    HybridPipeline(model, tokenizer, siglip=siglip).save_pretrained(root / "pipe")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(root / "in.png")
    return root / "pipe"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    if "--help" not in argv:
        argv = (*argv, "--device", "cpu")  # the same numbers on a machine with a GPU
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_k_images_of_the_model_size_reproducibly(model_dir, tmp_path, capsys):
    gen = ("generate", "a photo of a red circle", "--model", str(model_dir), "--steps", "2", "--seed", "0")
    code, out, _ = run(capsys, *gen, "-o", str(tmp_path / "a.png"), "--num-images", "3")
    paths = [tmp_path / f"a_{i}.png" for i in range(3)]
    assert code == 0 and out.split() == [str(p) for p in paths]
    assert sorted(tmp_path.iterdir()) == paths
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(im.shape == (32, 32, 3) for im in images)
    assert not np.array_equal(images[0], images[1])  # image i gets seed + i
    code, out, _ = run(capsys, *gen, "-o", str(tmp_path / "b"), "--image", str(model_dir.parent / "in.png"))
    assert code == 0 and out.split() == [str(tmp_path / "b.png")]  # K=1: no index; .png added
    code, _, _ = run(capsys, *gen, "-o", str(tmp_path / "again" / "a.png"), "--num-images", "3")
    assert code == 0
    for i, im in enumerate(images):  # same seed, same pixels
        assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / f"a_{i}.png")), im)


def test_chat_streams_the_answer(model_dir, monkeypatch):
    class Recorder:
        def __init__(self):
            self.writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return len(s)

        def flush(self) -> None: ...

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    img = str(model_dir.parent / "in.png")
    assert main(["chat", "--model", str(model_dir), "--image", img, "--image", img, "What is this?",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "".join(out.writes) == " circle circle circle circle\n"
    assert len([w for w in out.writes if w.strip()]) >= 4  # one piece per token, not all at the end


def test_chat_never_prints_text_a_stop_string_later_cuts(model_dir, capsys):
    # " circle" is shown before " circle circle" reveals the stop string "circle c": it must not be printed
    code, out, _ = run(capsys, "chat", "--model", str(model_dir), "Say it.", "--stop", "circle c",
                       "--max-new-tokens", "6")
    assert code == 0 and out == " \n"
    code, out, _ = run(capsys, "chat", "--model", str(model_dir), "Say it.", "--stop", "e c", "--stop", "blue")
    assert code == 0 and out == " circl\n"


def test_interleave_prints_text_and_image_placeholders_in_order(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "story"
    code, out, _ = run(capsys, "interleave", "Here is a picture.", "--model", str(model_dir), "-o", str(out_dir),
                       "--temperature", "1", "--seed", "1", "--max-new-tokens", "12", "--max-images", "2",
                       "--steps", "2")
    assert code == 0
    lines = out.splitlines()
    shown = [m.group(1) for m in map(re.compile(r"\[image: (.*)\]").fullmatch, lines) if m]
    assert shown == [str(out_dir / f"image_{i}.png") for i in range(len(shown))] and shown
    assert sorted(out_dir.iterdir()) == [Path(p) for p in shown]
    assert all(Image.open(p).size == (32, 32) for p in shown)
    texts = [line for line in lines if not line.startswith("[image: ")]
    assert texts and all(set(t.split()) == {"circle"} for t in texts)


def test_info_prints_the_parameter_count_and_components(model_dir, capsys):
    n = HybridPipeline.from_pretrained(model_dir).info()["parameters"]
    code, out, _ = run(capsys, "info", str(model_dir))
    assert code == 0
    assert re.search(rf"^parameters\s+{n:,} ", out, re.MULTILINE)
    assert re.search(r"^image_size\s+32$", out, re.MULTILINE)
    for part in ("config.json", "model.safetensors", "scheduler.json", "siglip/", "tokenizer/"):
        assert re.search(rf"^  {re.escape(part)}\s+[\d.]+ k?M?B$", out, re.MULTILINE), part


def test_model_folder_comes_from_the_env_and_a_missing_one_is_a_clear_error(model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    missing = tmp_path / "no_such_model"
    code, out, err = run(capsys, "generate", "x", "--model", str(missing), "-o", str(tmp_path / "x.png"))
    assert code == 2 and out == "" and not (tmp_path / "x.png").exists()
    assert err.strip().endswith(f"hybrid: error: model folder {missing} does not exist; pass --model DIR "
                                "(or set HYBRID_MODEL)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYBRID_MODEL", raising=False)
    code, _, err = run(capsys, "info")
    assert code == 2 and "runs/recipe/hybrid/final" in err and "make demo" in err and "Traceback" not in err
    monkeypatch.setenv("HYBRID_MODEL", str(model_dir))
    code, out, _ = run(capsys, "info")
    assert code == 0 and re.search(rf"^folder\s+{re.escape(str(model_dir))}$", out, re.MULTILINE)


def test_pipeline_errors_exit_2_without_a_traceback(model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "chat", "--model", str(model_dir), "--image", str(tmp_path / "gone.png"), "hi")
    assert code == 2 and err.splitlines()[-1] == f"hybrid: error: image file {tmp_path / 'gone.png'} does not exist"
    code, _, err = run(capsys, "generate", "a red circle " * 60, "--model", str(model_dir), "--seed", "0",
                       "-o", str(tmp_path / "x.png"))
    assert code == 2 and re.fullmatch(r"hybrid: error: the prompt is \d+ tokens; .* exceeds the context of 128 "
                                      r"tokens \(max_seq_len\)", err.splitlines()[-1])
    (tmp_path / "broken").mkdir()
    code, _, err = run(capsys, "info", str(tmp_path / "broken"))
    assert code == 2 and f"hybrid: error: {tmp_path / 'broken'} has no config.json" in err
    code, _, err = run(capsys, "generate", "x", "--model", str(model_dir), "-o", str(tmp_path / "x.jpgx"))
    assert code == 2 and "unknown image file extension '.jpgx'" in err and "loading" not in err  # checked first
    code, _, err = run(capsys, "generate", "x", "--steps", "0")
    assert code == 2 and "--steps: must be >= 1" in err  # argparse's own usage error


def test_a_scheduler_the_model_was_not_trained_with_is_an_error(model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--model", str(model_dir), "--scheduler", "ddpm", "--steps", "1",
                       "--seed", "0", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "hybrid: error: scheduler 'ddpm' predicts epsilon" in err.splitlines()[-1]


def test_help_describes_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("generate", "chat", "interleave", "info"):
        assert re.search(rf"^    {cmd}\b", out, re.MULTILINE) and f"hybrid {cmd} " in out  # listed, with an example
        code, sub, _ = run(capsys, cmd, "--help")
        assert code == 0 and f"usage: hybrid {cmd}" in sub and "examples:" in sub and "--model DIR" in sub


def test_installed_console_script():
    script = Path(sys.executable).parent / "hybrid"
    if not script.exists():
        pytest.skip("the console script is not installed (pip install -e .)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "usage: hybrid" in done.stdout and "interleave" in done.stdout
    done = subprocess.run([str(script), "info", "/nonexistent/model"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and done.stderr.startswith("hybrid: error: model folder /nonexistent/model")
