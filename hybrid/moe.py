"""A sparse mixture-of-experts feed-forward layer (top-k routing) and the router's auxiliary losses.

Each token's hidden state goes through a linear router to one logit per expert; the top-k experts
(softmax probabilities, renormalised over the k chosen when k > 1, as Mixtral does) each run their
SwiGLU on the token and the outputs are summed with those weights. Two routing rules:

* "agnostic" (the default): every token may choose any expert. The Apple study ("Scaling Laws for
  Native Multimodal Models") found this better than fixing experts per modality, and its experts
  specialised by modality on their own; ``python -m eval.moe_routing`` measures that here.
* "aware": text tokens choose among the text experts (the first ones), image tokens among the
  image experts (the last ``image_experts``), by masking the other group's logits.

Dispatch is dropless by default (every assignment computed); with a capacity factor each expert
takes at most ``ceil(factor * tokens * k / experts)`` assignments in training (tokens and experts
of its modality group under "aware" routing), earliest tokens first, and the rest are dropped (the
token keeps only its residual), as in Switch Transformer / GShard. Evaluation and generation are
dropless, so a token's output never depends on what else is in the batch.

The layer is loss-free like the rest of the model: it returns its router logits and choices
(``RouterOutput``); ``router_losses`` turns them into the load-balancing loss (Switch Transformer)
and the router z-loss (ST-MoE), and ``hybrid.losses.hybrid_loss`` adds them to the objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Token modality codes the router reads (``HybridModel`` derives them from the input ids).
TEXT, IMAGE, PAD = 0, 1, -1


@dataclass
class RouterOutput:
    logits: Tensor  # (T, E) fp32 router logits of every token (padding included)
    experts: Tensor  # (T, k) chosen experts per token
    modality: Tensor  # (T,) TEXT / IMAGE / PAD
    allowed: Tensor  # (T, E) bool: the experts each token could choose (all, or its modality's)
    dropped: Tensor  # () number of (token, expert) assignments dropped for capacity


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, make_expert: Callable[[], nn.Module],
                 capacity_factor: float | None = None, routing: str = "agnostic", image_experts: int = 0):
        super().__init__()
        if routing not in ("agnostic", "aware"):
            raise ValueError(f"routing must be 'agnostic' or 'aware', got {routing!r}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.routing, self.image_experts = routing, image_experts
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))

    def allowed_experts(self, modality: Tensor) -> Tensor:
        """(T,) modality codes -> (T, E) bool: which experts each token may be routed to."""
        E = self.n_experts
        if self.routing == "agnostic":
            return modality.new_ones(modality.shape[0], E, dtype=torch.bool)
        is_image_expert = torch.arange(E, device=modality.device) >= E - self.image_experts  # (E,)
        return is_image_expert[None, :] == (modality == IMAGE)[:, None]  # (T, E); padding -> text experts

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, RouterOutput]:
        """x: (B, T, D); modality: (B, T) TEXT / IMAGE / PAD -> (B, T, D) and the router's output."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D) all tokens of the batch
        modality = modality.reshape(-1)
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 (bf16 ties flip choices)
            logits = F.linear(x.float(), self.router.weight.float())  # (T, E)
        allowed = self.allowed_experts(modality)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        gate, chosen = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.top_k > 1:
            gate = gate / gate.sum(-1, keepdim=True)
        gate = gate.to(x.dtype)
        real = modality != PAD  # padding is not dispatched: its output is 0 (it keeps its residual)
        out = torch.zeros_like(x)
        dropped = x.new_zeros((), dtype=torch.long)
        capacity = [None] * self.n_experts
        if self.capacity_factor is not None and self.training:
            # per expert: the tokens that may choose it, shared among the experts of its group
            may = (allowed & real[:, None]).sum(0).tolist()  # (E,) one sync
            group = [self.n_experts] * self.n_experts
            if self.routing == "aware":
                n_img = self.image_experts
                group = [self.n_experts - n_img] * (self.n_experts - n_img) + [n_img] * n_img
            capacity = [math.ceil(self.capacity_factor * m * self.top_k / g) for m, g in zip(may, group)]
        for e, expert in enumerate(self.experts):
            # Every expert runs, even on no token: each parameter is used in every step (DDP and
            # ZeRO-3 reduce / gather the same parameters in the same order on every rank).
            token, slot = ((chosen == e) & real[:, None]).nonzero(as_tuple=True)  # in token order
            cap = capacity[e]
            if cap is not None and token.numel() > cap:
                dropped = dropped + (token.numel() - cap)
                token, slot = token[:cap], slot[:cap]
            y = expert(x[token]) * gate[token, slot, None]  # (n_e, D)
            out = out.index_add(0, token, y)
        return out.view(shape), RouterOutput(logits, chosen, modality, allowed, dropped)


def router_losses(routers: list[RouterOutput]) -> tuple[Tensor, Tensor]:
    """Mean over MoE layers of (load-balancing loss, router z-loss); padding tokens excluded.

    Load balance (Switch Transformer, generalised to top-k): ``E * sum_e f_e * P_e`` with ``f_e``
    the share of the k assignments given to expert e and ``P_e`` its mean router probability; 1.0
    when both are uniform, E when one expert takes everything with certainty (it can dip below 1
    when the assignments and the probabilities are unbalanced in opposite directions). With modality-aware routing each modality's experts are balanced over
    that modality's tokens (``E_g * sum f P`` inside the group), weighted by the group's tokens.
    z-loss (ST-MoE): mean squared logsumexp of the router logits, keeping logits small."""
    balance, z = [], []
    for r in routers:
        real = r.modality != PAD
        logits, chosen, allowed = r.logits[real], r.experts[real], r.allowed[real]
        if not logits.shape[0]:
            balance.append(logits.sum() * 0.0)
            z.append(logits.sum() * 0.0)
            continue
        z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)  # (T, E)
        counts = F.one_hot(chosen, logits.shape[-1]).sum(1).float()  # (T, E) 0/1 per token
        # groups of tokens sharing the same allowed set (one group when routing is agnostic)
        groups = [allowed[:, 0]] if bool(allowed.all()) else [allowed[:, 0], ~allowed[:, 0]]
        total = logits.new_zeros(())
        for g in groups:
            if not g.any():
                continue
            members = allowed[g][0]  # (E,) the group's experts
            f = counts[g].mean(0)[members] / chosen.shape[1]
            p = probs[g].mean(0)[members]
            total = total + int(members.sum()) * (f * p).sum() * (g.sum() / g.numel())
        balance.append(total)
    return torch.stack(balance).mean(), torch.stack(z).mean()
