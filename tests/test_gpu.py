"""GPU-only checks (flex attention has no CPU backward; bf16 is a GPU path). They run wherever
CUDA is present; on CPU machines the CPU twins of these checks live in test_masks / test_model."""

import pytest
import torch
from PIL import Image

from hybrid.model import HybridModel
from hybrid.sequence import SampleBuilder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SAMPLES = [["a photo of a red circle", Image.new("RGB", (32, 32), (255, 0, 0))],
           ["Here is a picture.", Image.new("RGB", (32, 32), (0, 0, 255)), "And another one below it."]]


@cuda
def test_flex_backward_equals_sdpa_backward(debug_cfg, tokenizer):
    model = HybridModel(debug_cfg).cuda()
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    batch = SampleBuilder(tokenizer, debug_cfg, caption_dropout=0.0)(SAMPLES * 3).to("cuda")
    n = batch.gen_index.shape[0]
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(n, debug_cfg.image_tokens, debug_cfg.patch_dim, device="cuda", generator=g)
    t = torch.rand(n, device="cuda", generator=g) * 1000
    grads = {}
    for impl in ("sdpa", "flex"):
        model.zero_grad()
        out = model(batch.input_ids, batch.position_ids, batch.attention_mask(impl), gen_tokens=x,
                    gen_index=batch.gen_index, gen_timesteps=t)
        (out.logits.float().square().mean() + out.image_pred.float().square().mean()).backward()
        grads[impl] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for k in grads["sdpa"]:
        torch.testing.assert_close(grads["flex"][k], grads["sdpa"][k], atol=1e-4, rtol=1e-3, msg=k)


@cuda
def test_bf16_autocast_forward_close_to_fp32(debug_cfg, tokenizer):
    model = HybridModel(debug_cfg).cuda().eval()
    batch = SampleBuilder(tokenizer, debug_cfg, caption_dropout=0.0)(SAMPLES).to("cuda")
    x = torch.randn(2, debug_cfg.image_tokens, debug_cfg.patch_dim, device="cuda")
    t = torch.tensor([10.0, 900.0], device="cuda")
    args = (batch.input_ids, batch.position_ids, batch.attention_mask("flex"))
    with torch.no_grad():
        ref = model(*args, gen_tokens=x, gen_index=batch.gen_index, gen_timesteps=t).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(*args, gen_tokens=x, gen_index=batch.gen_index, gen_timesteps=t).logits
    torch.testing.assert_close(low.float(), ref, atol=5e-2, rtol=5e-2)
