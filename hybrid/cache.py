"""The key/value cache that lets generation run each token (or each denoising step's image
tokens) once against an already-computed prefix.

Layout. One preallocated buffer per layer for keys and one for values, (B, H_kv, capacity, hd).
Rows are *left*-padded: every row's newest cached token sits at index ``length - 1``, so one
cache holds a batch of prompts of different lengths (and the conditional and unconditional
rows of classifier-free guidance). ``valid`` (B, capacity) marks real tokens; padding slots are
masked out of every later query. ``next_pos`` (B,) is each row's next RoPE position, which is
the row's real length, not the buffer index.

``CacheGroups`` runs several caches as one batch (the conditional and unconditional rows of
classifier-free guidance), each part attending only to its own buffer.

Writing and keeping are separate. During a forward pass every layer writes the new chunk's
keys/values at ``[length, length + n)`` and attends to ``[0, length + n)``; only ``commit``
advances ``length``. A denoising step therefore runs the image tokens against the prefix and
leaves the cache as it was (the next step overwrites the same slots), while a decoded token or a
finished image is committed and becomes part of the prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, n_kv_heads, max(capacity, 1), head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, shape[2], dtype=torch.bool, device=device)
        # the token ids of the cached slots (-1: never written): what a pooled text condition reads
        self.ids = torch.full((batch, shape[2]), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False  # any kept slot masked out (left padding)? if not, masks can often be skipped

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "KVCache":
        c = model.config
        p = next(model.parameters())
        # the decoder's layers only: a late-fusion vision encoder reads whole image spans, uncached
        return cls(len(model.layers), batch, c.n_kv_heads, c.head_dim, capacity, p.device, p.dtype)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def device(self) -> torch.device:
        return self.valid.device

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more slots (doubling, so a long decode reallocates rarely)."""
        need = self.length + n
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-2], cap - t.shape[-2], t.shape[-1])], dim=-2)
        self.keys = [grow(k) for k in self.keys]
        self.values = [grow(v) for v in self.values]
        self.ids = torch.cat([self.ids, self.ids.new_full((self.batch, cap - self.capacity), -1)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch, cap - self.capacity)], dim=1)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store a chunk's (B, H_kv, n, hd) keys/values after the kept prefix; return the keys and
        values the chunk attends to, (B, H_kv, length + n, hd). Call ``reserve(n)`` first."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_ids(self, input_ids: Tensor) -> None:
        """Record a chunk's (B, n) token ids after the kept prefix (kept with it by ``commit``)."""
        self.ids[:, self.length:self.length + input_ids.shape[1]] = input_ids

    def commit(self, valid: Tensor) -> None:
        """Keep the chunk just written; ``valid`` (B, n) marks its real tokens (False: padding)."""
        n = valid.shape[1]
        self.padded = self.padded or not bool(valid.all())
        self.valid[:, self.length:self.length + n] = valid
        self.next_pos += valid.sum(1)
        self.length += n

    def positions(self, n: int) -> Tensor:
        """(B, n) RoPE positions for the next ``n`` real tokens of every row."""
        return self.next_pos[:, None] + torch.arange(n, device=self.next_pos.device)

    def select(self, rows: Tensor | list[int]) -> "KVCache":
        """A cache holding only ``rows`` (e.g. the conditional rows once an image is done)."""
        rows = torch.as_tensor(rows, device=self.valid.device)
        out = KVCache.__new__(KVCache)
        out.keys = [k[rows] for k in self.keys]
        out.values = [v[rows] for v in self.values]
        out.valid, out.next_pos, out.length = self.valid[rows], self.next_pos[rows], self.length
        out.ids = self.ids[rows]
        out.padded = not bool(out.valid[:, :out.length].all())
        return out

    # one cache is one group of rows sharing a buffer; CacheGroups holds several
    @property
    def parts(self) -> list["KVCache"]:
        return [self]

    @property
    def rows(self) -> list[slice]:
        return [slice(0, self.batch)]


class CacheGroups:
    """Several caches run as one batch: the rows of each part attend only to their own part's
    buffer. Classifier-free guidance uses it: the unconditional rows hold ``<bos><boi>``, two
    tokens, so their attention should not sweep the conditional prompt's length of padding.
    The projections and MLPs still run on the whole batch; only attention goes part by part."""

    def __init__(self, parts: list[KVCache]):
        self.parts = parts
        ends = torch.tensor([p.batch for p in parts]).cumsum(0).tolist()
        self.rows = [slice(e - p.batch, e) for e, p in zip(ends, parts)]

    @property
    def batch(self) -> int:
        return sum(p.batch for p in self.parts)

    @property
    def length(self) -> int:
        return max(p.length for p in self.parts)

    @property
    def next_pos(self) -> Tensor:
        return torch.cat([p.next_pos for p in self.parts])

    @property
    def device(self) -> torch.device:
        return self.parts[0].valid.device

    def reserve(self, n: int) -> None:
        for p in self.parts:
            p.reserve(n)

    def write_ids(self, input_ids: Tensor) -> None:
        for p, r in zip(self.parts, self.rows):
            p.write_ids(input_ids[r])

    def commit(self, valid: Tensor) -> None:
        for p, r in zip(self.parts, self.rows):
            p.commit(valid[r])

    def select(self, rows: list[int]) -> KVCache:
        """The rows of one part, as a plain cache (e.g. the conditional rows after an image)."""
        for p, r in zip(self.parts, self.rows):
            if all(r.start <= i < r.stop for i in rows):
                return p.select([i - r.start for i in rows])
        raise ValueError(f"rows {rows} span several parts of the group")
