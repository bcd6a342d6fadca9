"""Export a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3) as ONE safetensors file, one parameter at a time.

    python -m train.export_zero runs/x/checkpoints/step_0001000 runs/x/export               # fp32
    python -m train.export_zero runs/x runs/x/export --dtype bf16     # the run's newest complete checkpoint
    python -m train.export_zero <checkpoint> <out> --only model       # model.safetensors + config.json
    python -m train.export_zero <checkpoint> <out> --only weights     # model.safetensors (any ZeRO checkpoint)

The checkpoints are those a DeepSpeed run saves every ``save_every`` steps, e.g. from

    accelerate launch --config_file train/accelerate/deepspeed_zero3.yaml -m train train/configs/tiny.yaml

(``<output_dir>/checkpoints/step_XXXXXXX/``; ``deepspeed_zero2.yaml`` runs write ZeRO-2 ones). By
default ``<out>`` becomes a ``HybridPipeline.from_pretrained`` folder: ``model.safetensors`` (the
fp32 master weights, cast to ``--dtype``), ``config.json`` (the model config the checkpoint's
``trainer_state.json`` records, checked against every tensor's shape before anything is written),
``tokenizer/`` (the run's), ``scheduler.json`` (diffusion head) and ``vq/`` / ``siglip/`` (copied
from where the run took them: its ``vq_path`` / ``siglip_path`` or ``init_from``'s copies;
``--vq`` / ``--siglip`` point elsewhere). ``--ema`` exports the EMA weights of a run with
``ema_decay`` instead (kept beside the ZeRO state in ``run_objects*.safetensors``: whole, or per
rank under ZeRO-3). A run with ``siglip_trainable`` needs ``--only model`` (the fine-tuned encoder
is not exported).

Why not DeepSpeed's ``zero_to_fp32.py`` (shipped in each checkpoint): it builds the whole state
dict (a 5 GB shard by default: the whole model below that) in memory before ``save_file`` writes
it, and every page of the ranks' files it reads stays mapped. Here nothing but one chunk of one
parameter is ever in memory: the safetensors header is computed up front from the shapes
DeepSpeed records, then each parameter is copied from the ranks' memory-mapped files to the output
in chunks of ``CHUNK_ELEMENTS``, and the pages just read are handed back to the kernel
(``bench/results/zero_export.md`` has the measured peaks).

Where the weights are (DeepSpeed 0.19; the layout its ``zero_to_fp32.py`` reads too):
  * ``<step>/latest`` names the tag folder (accelerate: ``pytorch_model``). In it, per data-parallel
    rank r, ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` holds the optimizer state: the rank's
    fp32 master weights plus its Adam moments (which are never read here). ``partition_count`` in it
    is the number of ranks. Model-state files hold ``param_shapes`` (one ordered name -> shape map
    per flat group, in flat order), buffers (``module``, with ``buffer_names``), frozen parameters
    and ``shared_params`` (tied names: alias -> stored name): one per rank under ZeRO-3
    (``zero_pp_rank_{r}_mp_rank_00_model_states.pt``), one ``mp_rank_00_model_states.pt`` otherwise.
  * ZeRO-3 (``fp32_flat_groups``): every parameter is split on its own, ``p = ceil(numel / ranks)``
    elements per rank, rank r holding elements ``[r*p, (r+1)*p)`` of the flattened parameter (the
    last ranks zero-padded); a rank's groups, back to back, hold its share of every parameter in
    ``param_shapes`` order, with nothing in between.
  * ZeRO-1/2 (``single_partition_of_fp32_groups``): each group is flattened whole (parameters in
    ``param_shapes`` order, ``param_alignment_paddings[g][i]`` elements after parameter i) and cut
    into one contiguous slice per rank; the ranks' slices, concatenated, give the group back (the
    trailing padding to a multiple of the rank count is stripped when DeepSpeed saves).
The files are pickles: they are read with ``torch.load(weights_only=True, mmap=True)``, allowing
exactly the DeepSpeed classes they contain (``ALLOWED_GLOBALS``).
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import json
import math
import mmap
import pickle
import re
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from train.state_io import OBJECTS_FILE, STATE_FILE, latest_checkpoint, rank_objects_file

# The file names of hybrid.checkpoint (not imported: it pulls in the model code, ~300 MB and ~10 s
# with accelerate, which an exporter of weights does not need); the run's own come from state_io.
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SCHEDULER_FILE = "scheduler.json"
TAG_FILE = "latest"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# One write (and, for a cast, one buffer): 64 MiB of fp32. Bounds memory for any parameter size.
CHUNK_ELEMENTS = 1 << 24

# The DeepSpeed classes pickled in its checkpoint files (found from weights_only's refusals):
# ZeRO's stage enum, the loss scaler object (static; dynamic under fp16) and ZeRO-1/2's
# param_slice_mappings entries. Anything else in a file is refused.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt")
_STAGE12_MODEL_FILE = "mp_rank_00_model_states.pt"


# --- safetensors, written as a stream ------------------------------------------------------

# https://github.com/huggingface/safetensors#format
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file: its header entry, and ``chunks()``, which yields its
    elements in row-major order as tensors of ``dtype`` (any shapes, numels summing to the
    tensor's), produced only when the writer reaches this tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes before the data of a safetensors file: the header's length (8 bytes, little-endian
    unsigned), then the header, JSON: name -> dtype, shape and ``data_offsets`` (begin, end bytes
    into the data, which are the tensors back to back in this order), plus ``__metadata__``
    (str -> str). Spaces pad the JSON to a multiple of 8 so the data starts 8-byte aligned."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        if s.name in header:
            raise ValueError(f"tensor name {s.name!r} appears twice (or is reserved)")
        if s.dtype not in _ST_DTYPES:
            raise TypeError(f"{s.name}: safetensors has no code for {s.dtype}")
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: str | Path, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> int:
    """Write ``specs`` as one safetensors file, streaming: the header first (it only needs names,
    dtypes and shapes), then each tensor's bytes, chunk by chunk, in header order. Only one chunk
    is in memory at a time. Written to ``<path>.partial`` and renamed when complete, so an
    interrupted export never leaves a truncated file under the real name. Returns the file size."""
    if sys.byteorder != "little":  # safetensors is little-endian; tensors are written as in memory
        raise RuntimeError("write_safetensors writes tensors' memory as is: it needs a little-endian machine")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(safetensors_header(specs, metadata))
            for s in specs:
                written = 0
                for chunk in s.chunks():
                    if chunk.dtype != s.dtype:
                        raise TypeError(f"{s.name}: a chunk has dtype {chunk.dtype}, the header says {s.dtype}")
                    raw = chunk.detach().contiguous().reshape(-1).view(torch.uint8)  # no copy if contiguous
                    f.write(raw.numpy())  # the buffer itself: no bytes object is made
                    written += raw.numel()
                if written != s.nbytes:
                    raise ValueError(f"{s.name}: wrote {written} bytes, the header promised {s.nbytes}")
            size = f.tell()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def save_tensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> int:
    """``write_safetensors`` for tensors already in memory (``safetensors.torch.save_file``'s job)."""
    specs = [TensorSpec(k, t.dtype, tuple(t.shape), lambda t=t: (t,)) for k, t in tensors.items()]
    return write_safetensors(path, specs, metadata)


# --- memory: giving back the pages of the mapped files ---------------------------------------

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def mapped_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a flat view of the memory-mapped file: nothing is
    read until touched (safetensors' own loaders read each tensor whole)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_NAMES[info["dtype"]]
        a, b = info["data_offsets"]
        count = (b - a) // dtype.itemsize
        with warnings.catch_warnings():  # the map is read-only, and never written through
            warnings.simplefilter("ignore", UserWarning)
            out[name] = (torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + a) if count
                         else torch.empty(0, dtype=dtype))
    return out


def _release(view: Tensor, storage: Tensor) -> None:
    """Drop the pages of ``view`` (a slice of ``storage``, a tensor memory-mapped from a checkpoint
    file by ``torch.load(mmap=True)``) from this process. Pages of a mapped file that were read
    count in the process's resident memory until unmapped, so reading every rank's master weights
    through the maps would end up holding all of them; dropping each after use keeps one chunk's
    worth. It is safe because the maps are never written: a clean file-backed page is re-read from
    the file if touched again. Only whole pages inside ``storage`` are dropped (never a neighbour's
    memory). A no-op off Linux, where the kernel still reclaims such pages under pressure."""
    if _libc is None or view.numel() == 0:
        return
    page = mmap.PAGESIZE
    lo_bound = storage.data_ptr()
    hi_bound = lo_bound + storage.numel() * storage.element_size()
    lo = max(view.data_ptr() // page * page, -(-lo_bound // page) * page)
    hi = min(-(-(view.data_ptr() + view.numel() * view.element_size()) // page) * page, hi_bound // page * page)
    if hi > lo:
        _libc.madvise(lo, hi - lo, _MADV_DONTNEED)  # advisory: a failure only costs memory


# --- reading a ZeRO checkpoint -----------------------------------------------------------------


def _allowed_globals() -> list:
    import importlib

    out = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError) as e:
            raise ImportError(f"reading a DeepSpeed checkpoint needs the deepspeed package (its files pickle "
                              f"DeepSpeed classes such as {name}): {e}") from e
    return out


def load_ds_file(path: str | Path) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped (tensor data is read from disk only when
    touched) and unpickled with ``weights_only=True`` allowing only ``ALLOWED_GLOBALS``."""
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: torch.load(weights_only=True) refused it (only DeepSpeed's "
                                         f"{', '.join(ALLOWED_GLOBALS)} are allowed):\n{e}") from None


def _has_rank_files(folder: Path) -> bool:
    return any(_RANK_FILE.fullmatch(p.name) for p in folder.iterdir())


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(step folder, tag folder)`` for a checkpoint folder (holding ``latest``, or else a single
    folder of rank files), its tag folder itself, or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder")
    if not (path / TAG_FILE).is_file() and (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"{path / 'checkpoints'} has no complete checkpoint (a step_* folder with "
                                    f"{STATE_FILE})")
        path = newest
    if (path / TAG_FILE).is_file():
        tag = (path / TAG_FILE).read_text().strip()
        if not tag or not (path / tag).is_dir():
            raise FileNotFoundError(f"{path / TAG_FILE} names the tag folder {tag!r}, which {path} lacks")
        return path, path / tag
    if _has_rank_files(path):  # given the tag folder
        return path.parent, path
    tags = [p for p in path.iterdir() if p.is_dir() and _has_rank_files(p)]
    if len(tags) == 1:  # no 'latest' (deleted, or not copied), but only one candidate
        return path, tags[0]
    raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint: it has no '{TAG_FILE}' file naming a tag "
                            f"folder, no zero_pp_rank_*_mp_rank_00_optim_states.pt files and no checkpoints/step_* "
                            f"folders")


@dataclass(frozen=True)
class Piece:
    """A run of elements of a checkpoint tensor (1-D, memory-mapped): part of one exported tensor."""

    source: Tensor
    start: int
    length: int


@dataclass(frozen=True)
class Entry:
    """An exported tensor: name, shape, dtype as stored, and where its elements are, in order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[Piece, ...]


class _Concat:
    """1-D tensors seen as one, without copying: ``pieces(start, n)`` says where elements are."""

    def __init__(self, parts: Sequence[Tensor]):
        self.parts = [p.view(-1) for p in parts]  # view: never a copy (a copy would not be mapped)
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + p.numel())
        self.numel = self.starts[-1]

    def pieces(self, start: int, n: int) -> list[Piece]:
        if start < 0 or start + n > self.numel:
            raise ValueError(f"elements [{start}, {start + n}) lie outside the {self.numel} stored")
        out, i = [], bisect.bisect_right(self.starts, start) - 1
        while n > 0:
            local = start - self.starts[i]
            take = min(n, self.parts[i].numel() - local)
            if take > 0:
                out.append(Piece(self.parts[i], local, take))
                start, n = start + take, n - take
            i += 1
        return out


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


class ZeroCheckpoint:
    """A DeepSpeed ZeRO checkpoint opened for reading: every tensor of the model (trainable
    parameters from the fp32 master weights, frozen ones, buffers) as ``entries``, lists of pieces
    of the ranks' memory-mapped files. Opening reads only the files' small pickled structure."""

    def __init__(self, path: str | Path):
        self.step_dir, self.tag_dir = find_checkpoint(path)
        optim, model = self._rank_files()
        first = load_ds_file(optim[min(optim)])
        osd = first.get("optimizer_state_dict")
        if not isinstance(osd, dict) or "zero_stage" not in osd or "partition_count" not in osd:
            raise ValueError(f"{optim[min(optim)]} is not a ZeRO optimizer state (no optimizer_state_dict with "
                             f"zero_stage and partition_count); stages 1-3 are supported")
        self.stage = int(osd["zero_stage"])
        counts = osd["partition_count"] if isinstance(osd["partition_count"], list) else [osd["partition_count"]]
        if len(set(counts)) != 1:
            raise ValueError(f"param groups are split over different rank counts {counts} (expert parallelism): "
                             f"not supported")
        self.world = int(counts[0])
        self._check_complete(optim, model)
        optim_states = [first if r == min(optim) else load_ds_file(optim[r]) for r in range(self.world)]
        if self.stage == 3:
            model_states = [load_ds_file(model[r]) for r in range(self.world)]
        else:
            model_states = [load_ds_file(self.tag_dir / _STAGE12_MODEL_FILE)]
        ms = model_states[0]
        if "param_shapes" not in ms:
            raise ValueError(f"{self.tag_dir}: the model-states file has no param_shapes")
        self.ds_version = ms.get("ds_version")
        self.aliases: dict[str, str] = dict(ms.get("shared_params") or {})  # tied: alias -> stored name
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        flat = []
        for r, sd in enumerate(optim_states):
            groups = sd["optimizer_state_dict"].get(key)
            if groups is None or len(groups) != len(ms["param_shapes"]):
                raise ValueError(f"rank {r}'s optimizer state has {'no' if groups is None else len(groups)} {key}; "
                                 f"the model states name {len(ms['param_shapes'])} parameter groups")
            flat.append(groups)
        if self.stage == 3:
            entries = self._zero3_params(ms["param_shapes"], flat)
        else:
            paddings = osd.get("param_alignment_paddings")
            entries = self._zero12_params(ms["param_shapes"], flat, paddings)
        entries += self._frozen(model_states) + self._buffers(ms)
        self.entries: list[Entry] = [e for e in entries if e.name not in self.aliases]
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.tag_dir}: some tensor names appear twice")
        missing = sorted(set(self.aliases.values()) - set(names))
        if missing:
            raise ValueError(f"shared_params point at tensors the checkpoint lacks: {missing}")
        self.trainer_state: dict = {}
        if (self.step_dir / STATE_FILE).is_file():
            self.trainer_state = json.loads((self.step_dir / STATE_FILE).read_text())

    def _rank_files(self) -> tuple[dict[int, Path], dict[int, Path]]:
        optim, model = {}, {}
        for p in self.tag_dir.iterdir():
            m = _RANK_FILE.fullmatch(p.name)
            if m:
                if int(m.group(2)) != 0:
                    raise ValueError(f"{p.name}: model/tensor-parallel checkpoints (mp_rank > 00) are not supported")
                (optim if m.group(3) == "optim" else model)[int(m.group(1))] = p
        if not optim:
            raise FileNotFoundError(f"{self.tag_dir} has no zero_pp_rank_*_mp_rank_00_optim_states.pt: not a DeepSpeed "
                                    f"ZeRO checkpoint")
        return optim, model

    def _check_complete(self, optim: dict[int, Path], model: dict[int, Path]) -> None:
        """Every rank's files are there (DeepSpeed's ``partition_count`` says how many ranks wrote it)."""
        need = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(self.world) if r not in optim]
        if self.stage == 3:
            need += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.world) if r not in model]
        elif not (self.tag_dir / _STAGE12_MODEL_FILE).is_file():
            need.append(_STAGE12_MODEL_FILE)
        extra = sorted(p.name for r, p in {**optim, **model}.items() if r >= self.world)
        if need:
            raise FileNotFoundError(f"{self.tag_dir} was written by {self.world} ranks (partition_count) but lacks "
                                    f"{', '.join(need)}: an incomplete copy, or a rank failed to save")
        if extra:
            raise ValueError(f"{self.tag_dir} was written by {self.world} ranks (partition_count) but also holds "
                             f"{', '.join(extra)}: files of another run mixed in?")

    def _zero3_params(self, shapes: list[dict], flat: list[list[Tensor]]) -> list[Entry]:
        ranks = [_Concat(groups) for groups in flat]
        if len({c.numel for c in ranks}) != 1:
            raise ValueError(f"the ranks' fp32 partitions differ in size: {[c.numel for c in ranks]}")
        dtype = flat[0][0].dtype
        entries, offset = [], 0
        for group in shapes:
            for name, shape in group.items():
                n = _numel(shape)
                share = -(-n // self.world)  # each rank's share of this parameter (the last ones padded)
                pieces = []
                for r, c in enumerate(ranks):
                    k = min(share, n - r * share)
                    if k > 0:
                        pieces += c.pieces(offset, k)
                entries.append(Entry(name, tuple(shape), dtype, tuple(pieces)))
                offset += share
        if offset != ranks[0].numel:
            raise ValueError(f"param_shapes account for {offset} elements per rank, the fp32 partitions hold "
                             f"{ranks[0].numel}: not the ZeRO-3 layout this exporter knows")
        return entries

    def _zero12_params(self, shapes: list[dict], flat: list[list[Tensor]], paddings: list | None) -> list[Entry]:
        entries = []
        for g, group in enumerate(shapes):
            buf = _Concat([flat[r][g] for r in range(self.world)])  # the ranks' slices give the group back
            pads = paddings[g] if paddings is not None else [0] * len(group)
            if len(pads) != len(group):
                raise ValueError(f"group {g}: {len(pads)} alignment paddings for {len(group)} parameters")
            offset = 0
            for (name, shape), pad in zip(group.items(), pads, strict=True):
                n = _numel(shape)
                entries.append(Entry(name, tuple(shape), flat[0][g].dtype, tuple(buf.pieces(offset, n))))
                offset += n + pad
            # Saved without the padding to a multiple of the rank count: exactly the parameters and
            # their paddings since DeepSpeed records param_alignment_paddings (older files: up to
            # that alignment, 2 x ranks, may remain, as zero_to_fp32.py allows).
            align = 2 * self.world
            if paddings is not None:
                ok = offset == buf.numel
            else:
                ok = -(-offset // align) == -(-buf.numel // align)
            if not ok:
                raise ValueError(f"group {g}: param_shapes account for {offset} elements, the ranks' fp32 slices "
                                 f"hold {buf.numel}: not the ZeRO-{self.stage} layout this exporter knows")
        return entries

    def _frozen(self, model_states: list[dict]) -> list[Entry]:
        """Parameters without gradient: kept in the model-states files (in their training dtype):
        whole under ZeRO-1/2, under ZeRO-3 split over the ranks like the trainable ones."""
        shapes = model_states[0].get("frozen_param_shapes") or {}
        entries = []
        for name, shape in shapes.items():
            frags = [ms["frozen_param_fragments"][name] for ms in model_states]
            n = _numel(shape)
            entries.append(Entry(name, tuple(shape), frags[0].dtype, tuple(_Concat(frags).pieces(0, n))))
        return entries

    def _buffers(self, ms: dict) -> list[Entry]:
        entries = []
        for name in ms.get("buffer_names") or []:
            t = ms["module"][name]
            if not t.is_contiguous():  # a view is needed for the mapped pages to be dropped safely
                raise ValueError(f"buffer {name} is stored non-contiguous")
            entries.append(Entry(name, tuple(t.shape), t.dtype, tuple(_Concat([t]).pieces(0, t.numel()))))
        return entries

    def keep_prefix(self, prefix: str) -> None:
        """Keep only the tensors named ``prefix...``, without it: the model inside a module that
        wraps it (the trainer's ``ModelWithEncoder`` with ``siglip_trainable``)."""
        kept = [Entry(e.name[len(prefix):], e.shape, e.dtype, e.pieces) for e in self.entries if e.name.startswith(prefix)]
        if not kept:
            raise ValueError(f"{self.tag_dir} has no tensors named {prefix}*")
        self.entries = kept
        self.aliases = {k[len(prefix):]: v[len(prefix):] for k, v in self.aliases.items() if k.startswith(prefix)}

    def use_ema(self) -> int:
        """Take the trainable parameters from the run's EMA (a run with ``ema_decay``;
        train/ema.py, saved by train/state_io.py under the name "ema") instead of the master
        weights: ``run_objects.safetensors`` holds the full fp32 shadow, or, under ZeRO-3, each
        rank's ``run_objects_rank{r}.safetensors`` its partition of every parameter (split as the
        master weights are, above). Memory-mapped like the rest. Returns the tensors replaced."""
        whole, ranks = self.step_dir / OBJECTS_FILE, [self.step_dir / rank_objects_file(r) for r in range(self.world)]
        if ranks[0].is_file():
            missing = [p.name for p in ranks if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{self.step_dir} lacks {', '.join(missing)}: the sharded EMA is incomplete")
            parts = [mapped_safetensors(p) for p in ranks]
        elif whole.is_file():
            parts = [mapped_safetensors(whole)]
        else:
            parts = []
        prefix = "ema/shadow/"
        shadow = [{k[len(prefix):]: t for k, t in part.items() if k.startswith(prefix)} for part in parts]
        if not shadow or not shadow[0]:
            raise FileNotFoundError(f"{self.step_dir} has no EMA weights (train with ema_decay > 0)")
        replaced = []
        for i, e in enumerate(self.entries):
            if e.name not in shadow[0]:
                continue
            n = _numel(e.shape)
            if len(shadow) == 1:  # the full shadow
                t = shadow[0][e.name]
                if t.numel() != n:
                    raise ValueError(f"EMA {e.name} has {t.numel()} elements, the parameter {n}")
                pieces = _Concat([t]).pieces(0, n)
            else:  # rank r holds elements [r * share, (r + 1) * share) of the flattened parameter
                share = -(-n // self.world)
                pieces = []
                for r, part in enumerate(shadow):
                    if part[e.name].numel() != share:
                        raise ValueError(f"rank {r}'s EMA part of {e.name} has {part[e.name].numel()} elements, "
                                         f"not the ZeRO-3 share {share}")
                    k = min(share, n - r * share)
                    if k > 0:
                        pieces += _Concat([part[e.name]]).pieces(0, k)
            self.entries[i] = Entry(e.name, e.shape, shadow[0][e.name].dtype, tuple(pieces))
            replaced.append(e.name)
        unknown = sorted(set(shadow[0]) - set(replaced))
        if unknown:
            raise ValueError(f"the EMA names tensors the checkpoint lacks: {unknown[:3]}")
        return len(replaced)

    # ---------------------------------------------------------------- output
    @property
    def step(self) -> int | None:
        return self.trainer_state.get("step")

    def out_dtype(self, entry: Entry, dtype: torch.dtype) -> torch.dtype:
        """Floating tensors become ``dtype``; others (integer buffers, masks) keep theirs."""
        return dtype if entry.dtype.is_floating_point else entry.dtype

    def chunks(self, entry: Entry, dtype: torch.dtype) -> Iterator[Tensor]:
        """``entry``'s elements in order, cast to ``dtype``, at most ``CHUNK_ELEMENTS`` at a time.
        Without a cast a chunk is the mapped file itself (no copy). Each chunk's pages are given
        back once the consumer asks for the next one."""
        for piece in entry.pieces:
            for a in range(0, piece.length, CHUNK_ELEMENTS):
                src = piece.source.narrow(0, piece.start + a, min(CHUNK_ELEMENTS, piece.length - a))
                yield src.to(dtype)
                _release(src, piece.source)

    def spec(self, entry: Entry, dtype: torch.dtype = torch.float32) -> TensorSpec:
        d = self.out_dtype(entry, dtype)
        return TensorSpec(entry.name, d, entry.shape, lambda: self.chunks(entry, d))

    def specs(self, dtype: torch.dtype = torch.float32) -> list[TensorSpec]:
        return [self.spec(e, dtype) for e in self.entries]

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
        """Every tensor, assembled (a copy), one at a time: e.g. to load into a model without a file."""
        for e in self.entries:
            d = self.out_dtype(e, dtype)
            t, i = torch.empty(_numel(e.shape), dtype=d), 0
            for c in self.chunks(e, d):
                t[i : i + c.numel()] = c
                i += c.numel()
            yield e.name, t.view(e.shape)

    def write(self, path: str | Path, dtype: torch.dtype = torch.float32) -> int:
        """One safetensors file with every tensor; tied aliases are recorded in the metadata as
        ``safetensors.torch.save_model`` does (alias -> stored name), so ``load_model`` fills them."""
        return write_safetensors(path, self.specs(dtype), {"format": "pt", **self.aliases})


# --- the model folder ---------------------------------------------------------------------------


def check_against_config(ckpt: ZeroCheckpoint, model_config: dict) -> None:
    """Raise a ValueError naming every tensor whose name or shape differs from what
    ``HybridModel(config)`` has (built on the meta device: no memory)."""
    from hybrid.config import HybridConfig
    from hybrid.model import HybridModel

    with torch.device("meta"):
        model = HybridModel(HybridConfig.from_dict(model_config))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {e.name: e.shape for e in ckpt.entries}
    have.update({alias: have[name] for alias, name in ckpt.aliases.items()})
    bad = [f"shape mismatch for {k}: checkpoint {have[k]}, model config {want[k]}"
           for k in want if k in have and have[k] != want[k]]
    bad += [f"the checkpoint lacks {k} {want[k]}" for k in want if k not in have]
    bad += [f"the model config has no {k} (checkpoint {have[k]})" for k in have if k not in want]
    if bad:
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ValueError(f"{ckpt.tag_dir} does not match its model config:\n  " + "\n  ".join(bad[:20]) + more)


def _train_config(ckpt: ZeroCheckpoint) -> dict:
    """The run's training config: trainer_state.json's copy, else the run's config.yaml."""
    if "train_config" in ckpt.trainer_state:
        return ckpt.trainer_state["train_config"]
    run_yaml = ckpt.step_dir.parent.parent / "config.yaml"
    if run_yaml.is_file():
        import yaml

        return yaml.safe_load(run_yaml.read_text()) or {}
    return {}


def _component(train_cfg: dict, key: str, name: str, override: str | Path | None) -> Path | None:
    """Where the run took a frozen component from (``train.trainer``'s rule: the configured path,
    else ``init_from``'s copy), or the caller's override; checked to exist."""
    if override is not None:
        src = Path(override)
    elif train_cfg.get(key):
        src = Path(train_cfg[key])
    elif train_cfg.get("init_from") and (Path(train_cfg["init_from"]) / name).is_dir():
        src = Path(train_cfg["init_from"]) / name
    else:
        return None
    if not src.is_dir():
        raise FileNotFoundError(f"the run's {name} folder {src} does not exist (relative paths are taken from the "
                                f"current folder): pass --{name} <folder>, or --only model")
    return src


def pipeline_sources(ckpt: ZeroCheckpoint, model_config: dict, vq: str | Path | None = None,
                     siglip: str | Path | None = None) -> dict[str, Path]:
    """The folders to copy into the pipeline folder (``tokenizer`` and, if the run used them,
    ``vq`` / ``siglip``), all checked before anything is written."""
    train_cfg = _train_config(ckpt)
    run_dir = ckpt.step_dir.parent.parent
    out = {"tokenizer": run_dir / "tokenizer"}
    if not (out["tokenizer"] / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer at {out['tokenizer']} (a training run keeps its tokenizer there); "
                                f"export with --only model for model.safetensors + config.json")
    if train_cfg.get("siglip_trainable") and siglip is None:
        raise ValueError("the run fine-tuned SigLIP (siglip_trainable=true) and its weights are not part of the "
                         "model's ZeRO state: export with --only model, or pass --siglip <folder>")
    src = _component(train_cfg, "vq_path", "vq", vq)
    if model_config.get("image_codec") == "vq":
        if src is None:
            raise FileNotFoundError("the model generates VQ latents but the run names no vq_path: pass --vq <folder>")
        out["vq"] = src
    src = _component(train_cfg, "siglip_path", "siglip", siglip)
    if src is not None:
        out["siglip"] = src
    return out


def write_pipeline_extras(out: Path, model_config: dict, sources: Mapping[str, Path]) -> None:
    """Everything of a ``HybridPipeline.save_pretrained`` folder but the weights and config.json."""
    from hybrid.config import HybridConfig
    from hybrid.sampling import scheduler_for

    for name, src in sources.items():
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(src, out / name)
    cfg = HybridConfig.from_dict(model_config)
    if cfg.image_head == "diffusion":  # what HybridPipeline would create and save for this model
        (out / SCHEDULER_FILE).write_text(json.dumps(scheduler_for(cfg).to_dict(), indent=2) + "\n")


@dataclass
class ExportSummary:
    checkpoint: Path
    out: Path
    stage: int
    world: int
    step: int | None
    dtype: torch.dtype
    tensors: int
    parameters: int
    bytes: int
    seconds: float

    def line(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        return (f"exported {self.checkpoint} (ZeRO-{self.stage}, {self.world} ranks{step}) -> {self.out / WEIGHTS}: "
                f"{self.tensors} tensors, {self.parameters:,} parameters, {self.bytes:,} bytes "
                f"{str(self.dtype).removeprefix('torch.')}, {self.seconds:.1f} s")


def export_zero_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | str = torch.float32,
                           only: str | None = None, vq: str | Path | None = None,
                           siglip: str | Path | None = None, ema: bool = False) -> ExportSummary:
    """Export a ZeRO checkpoint (a ``step_*`` folder, its tag folder, or a run folder: its newest
    complete checkpoint) into ``out``: a pipeline folder, or with ``only="model"`` model.safetensors
    + config.json (``hybrid.checkpoint.load_pretrained_model``), with ``only="weights"``
    model.safetensors alone (any ZeRO checkpoint; no config needed or checked). ``ema``: the EMA
    weights instead of the trained ones (what the trainer exports as final_ema/)."""
    t0 = time.perf_counter()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if only not in (None, "model", "weights"):
        raise ValueError(f"only must be None, 'model' or 'weights', not {only!r}")
    ckpt = ZeroCheckpoint(checkpoint)
    if any(e.name.startswith("encoder.") for e in ckpt.entries):  # siglip_trainable: the trainer's
        ckpt.keep_prefix("model.")  # ModelWithEncoder (model.* and the fine-tuned encoder.*)
    if ema:
        ckpt.use_ema()
    out = Path(out)
    model_config, sources = None, {}
    if only != "weights":  # everything is checked before anything is written
        model_config = ckpt.trainer_state.get("model_config")
        if model_config is None:
            raise FileNotFoundError(f"{ckpt.step_dir / STATE_FILE} has no model_config (not a checkpoint of "
                                    f"train.trainer?): export with --only weights")
        check_against_config(ckpt, model_config)
        if only is None:
            sources = pipeline_sources(ckpt, model_config, vq, siglip)
            for name, src in sources.items():  # e.g. out = the run folder: its tokenizer/ would be deleted
                if Path(src).resolve() == (out / name).resolve():
                    raise ValueError(f"exporting into {out} would overwrite {src}, which it copies from: "
                                     f"export into another folder")
    out.mkdir(parents=True, exist_ok=True)
    size = ckpt.write(out / WEIGHTS, dtype)
    if model_config is not None:
        (out / CONFIG).write_text(json.dumps(model_config, indent=2) + "\n")  # = HybridConfig.save
        if only is None:
            write_pipeline_extras(out, model_config, sources)
    return ExportSummary(ckpt.step_dir, out, ckpt.stage, ckpt.world, ckpt.step, dtype, len(ckpt.entries),
                         sum(_numel(e.shape) for e in ckpt.entries), size, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export_zero", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoints/step_XXXXXXX folder, its tag folder, or a run folder "
                                      "(its newest complete checkpoint)")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="floating tensors' dtype (default fp32)")
    p.add_argument("--only", choices=("model", "weights"), default=None,
                   help="model: model.safetensors + config.json; weights: model.safetensors alone")
    p.add_argument("--vq", default=None, help="the VQ tokenizer folder to copy (default: the run's)")
    p.add_argument("--siglip", default=None, help="the SigLIP folder to copy (default: the run's)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (a run with ema_decay > 0)")
    args = p.parse_args(argv)
    try:
        summary = export_zero_checkpoint(args.checkpoint, args.out, args.dtype, args.only, args.vq, args.siglip,
                                         args.ema)
    # KeyError: a tensor dtype unknown to safetensors; RuntimeError: a truncated or damaged .pt file
    except (FileNotFoundError, ValueError, ImportError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
