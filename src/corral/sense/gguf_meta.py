"""The fallback estimate: what a config takes, from the model's GGUF metadata alone.

Theory of operation
-------------------
Used where ``llama-fit-params`` is missing or fails. The header is read with a lean
reader over ``mmap`` and the ``gguf`` package's own tables (value types, quant block
sizes): ``gguf.GGUFReader`` parses every array (262,144 tokenizer strings on the test
model) into numpy objects and took 26 s here, against milliseconds for this reader.

The figures follow what llama-server allocates (checked against the buffer sizes it logs
at load, ``bench/fit.py``):

- model: the tensors' bytes;
- context (KV cache): per layer, cells x KV heads x (key length x K type size + value
  length x V type size). Full-attention layers hold ``-c`` cells (padded to 256);
  sliding-window layers hold, per slot, ``min(c / slots, window + ubatch)``;
- compute: the attention masks of one slot (its cells x ubatch x 2, full and window), the
  output rows (slots x vocab x 4) and the activations of one ubatch (ubatch x 4 x (2 x
  feed-forward + 4 x embedding + 2 x heads x key length)); without flash attention also the
  scores (heads x cells x ubatch x 4). ``llama-fit-params`` counts logits for a whole
  ubatch instead (vocab x ubatch x 4: 512 MiB on the test model), which llama-server does
  not allocate; so this estimate runs below it by about that much, closer to the truth.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from corral.core.fit import HOST, MIB, DeviceNeed, Estimate


def _gguf_constants() -> ModuleType:
    """``gguf.constants`` (ggml's own tables) without ``gguf/__init__``, which imports numpy
    and the whole reader (~15 MiB of the supervisor's memory) for tables of plain enums."""
    package = importlib.util.find_spec("gguf")
    if package is None or not package.submodule_search_locations:
        raise ImportError("the gguf package is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "constants.py"
    spec = importlib.util.spec_from_file_location("corral._gguf_constants", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses and enums look themselves up there
    spec.loader.exec_module(module)
    return module


_constants = _gguf_constants()
GGML_QUANT_SIZES = _constants.GGML_QUANT_SIZES
GGMLQuantizationType = _constants.GGMLQuantizationType
GGUFValueType = _constants.GGUFValueType

METHOD = "gguf metadata"
SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# Every n-th layer attends to the whole context, the others to a window (llama.cpp's
# hparams.set_swa_pattern per architecture), where the GGUF does not say it itself.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "llama4": 4,
               "gpt-oss": 2, "exaone4": 4}
KEEP_ARRAY = 4096  # numeric arrays up to this length are kept (per-layer values)


class GgufError(ValueError):
    pass


@dataclass(frozen=True)
class GgufMeta:
    kv: Mapping[str, Any]
    tensor_bytes: int
    vocab: int | None

    @property
    def arch(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.kv.get(f"{self.arch}.{key}", default)

    @property
    def trained_context(self) -> int | None:
        value = self.arch_value("context_length")
        return int(value) if isinstance(value, int) else None


def read_meta(path: str) -> GgufMeta:
    """Parse the header of a GGUF file; GgufError if it is not one or is cut short."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _Parser(m).meta()
    except (OSError, struct.error, ValueError, KeyError) as exc:
        raise GgufError(f"cannot read GGUF metadata of {path}: {exc}") from None


class _Parser:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GgufError("string runs past the end of the file")
        text = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return text

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        return self.take(SCALARS[GGUFValueType(vtype)])

    def array(self) -> Any:
        itype, count = self.take("<I"), self.take("<Q")
        if itype == GGUFValueType.STRING:
            for _ in range(count):
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            return count  # only the length of a string array is kept (the vocabulary size)
        if itype == GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        fmt = SCALARS[GGUFValueType(itype)]
        if count > KEEP_ARRAY:
            self.pos += count * struct.calcsize(fmt)
            return count
        return [self.take(fmt) for _ in range(count)]

    def meta(self) -> GgufMeta:
        if bytes(self.buf[:4]) != b"GGUF":
            raise GgufError("bad magic")
        self.pos = 4
        self.take("<I")  # version
        n_tensors, n_kv = self.take("<Q"), self.take("<Q")
        kv = {}
        for _ in range(n_kv):
            key = self.string()
            kv[key] = self.value(self.take("<I"))
        total, vocab = 0, None
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.take("<Q") for _ in range(self.take("<I"))]
            qtype = GGMLQuantizationType(self.take("<I"))
            self.take("<Q")  # offset
            block, size = GGML_QUANT_SIZES[qtype]
            elements = 1
            for d in dims:
                elements *= d
            total += elements // block * size
            if name == "token_embd.weight" and len(dims) == 2:
                vocab = dims[1]
        if vocab is None and isinstance(kv.get("tokenizer.ggml.tokens"), int):
            vocab = kv["tokenizer.ggml.tokens"]
        return GgufMeta(kv, total, vocab)


def type_size(name: str) -> float:
    """Bytes per element of a KV cache type (``f16``, ``q8_0``, ...)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
    return float(size) / float(block)


def estimate(meta: GgufMeta, flags: Mapping[str, str]) -> Estimate:
    """The estimate for a config whose memory-relevant flags are ``flags`` (canonical keys)."""
    slots = max(1, _int(flags.get("--parallel"), 1))
    ctx = _int(flags.get("--ctx-size"), 0) or meta.trained_context or 4096
    ctx = -(-ctx // 256) * 256
    ubatch = max(1, min(_int(flags.get("--ubatch-size"), 512),
                        _int(flags.get("--batch-size"), 2048), ctx))
    layers = int(meta.arch_value("block_count", 0))
    swa_cells = _swa_cells(meta, flags, ctx, slots, ubatch)
    kv_bytes = 0.0
    for il in range(layers):
        cells = ctx if swa_cells is None or _is_global(meta, il) else swa_cells
        kv_bytes += cells * _kv_per_cell(meta, il, flags)
    compute = _compute_bytes(meta, flags, ctx // slots, ubatch, slots,
                             None if swa_cells is None else swa_cells // slots)
    need = DeviceNeed(HOST, meta.tensor_bytes / MIB, kv_bytes / MIB, compute / MIB)
    return Estimate((need,), METHOD)


def _swa_cells(meta: GgufMeta, flags: Mapping[str, str], ctx: int, slots: int,
               ubatch: int) -> int | None:
    window = meta.arch_value("attention.sliding_window")
    if not isinstance(window, int) or window <= 0 or "--swa-full" in flags:
        return None
    if meta.arch not in SWA_PATTERN and "attention.sliding_window_pattern" not in \
            {k.split(".", 1)[-1] for k in meta.kv}:
        return None
    return slots * min(ctx // slots, window + ubatch)


def _is_global(meta: GgufMeta, il: int) -> bool:
    pattern = meta.arch_value("attention.sliding_window_pattern")
    if isinstance(pattern, list) and il < len(pattern):
        return not bool(pattern[il])  # true marks a sliding-window layer
    n = pattern if isinstance(pattern, int) and pattern > 0 else SWA_PATTERN.get(meta.arch, 1)
    return il % n == n - 1


def _kv_per_cell(meta: GgufMeta, il: int, flags: Mapping[str, str]) -> float:
    heads = meta.arch_value("attention.head_count", 1)
    kv_heads = meta.arch_value("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        kv_heads = kv_heads[il] if il < len(kv_heads) else kv_heads[-1]
    if isinstance(heads, list):
        heads = heads[il] if il < len(heads) else heads[-1]
    embd = int(meta.arch_value("embedding_length", 0))
    head_dim = embd // max(1, int(heads))
    k_len = int(meta.arch_value("attention.key_length", head_dim))
    v_len = int(meta.arch_value("attention.value_length", head_dim))
    k_type = type_size(flags.get("--cache-type-k", "f16"))
    v_type = type_size(flags.get("--cache-type-v", "f16"))
    return int(kv_heads) * (k_len * k_type + v_len * v_type)


def _compute_bytes(meta: GgufMeta, flags: Mapping[str, str], cells: int, ubatch: int,
                   slots: int, swa_cells: int | None) -> float:
    """``cells``/``swa_cells``: one slot's (llama-server gives each slot a stream)."""
    embd = int(meta.arch_value("embedding_length", 0))
    heads = _largest(meta.arch_value("attention.head_count", 1))
    ff = _largest(meta.arch_value("feed_forward_length", 4 * embd))
    k_len = int(meta.arch_value("attention.key_length", embd // max(1, heads)))
    outputs = slots * (meta.vocab or 0) * 4
    masks = (cells + (swa_cells or 0)) * ubatch * 2
    activations = ubatch * 4 * (2 * ff + 4 * embd + 2 * heads * k_len)
    scores = 0 if flags.get("--flash-attn", "auto") in ("on", "auto", "1", "true") \
        else heads * cells * ubatch * 4
    return outputs + masks + activations + scores


def _largest(value: Any) -> int:
    return int(max(value)) if isinstance(value, list) else int(value)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default
