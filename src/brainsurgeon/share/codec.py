"""The on-disk format of a Deep Compression model: codebooks, relative sparse indices, Huffman streams.

Every tensor of a state_dict is stored; weight tensors (floating, >= 2-D) as

* layout ``dense``: one symbol per weight, or ``sparse``: relative indexing (Han et al., ICLR 2016,
  sec. 2, fig. 2): per nonzero the number of zeros since the previous one (a *gap*, <= 2^b - 1;
  a longer run inserts a filler entry that stands for 2^b - 1 zeros and one stored zero);
* values: indices into the layer's codebook (its distinct values, <= 256 of them), or the raw
  values (``values="raw"``: the pruned-only stage);
* each integer stream coded with fixed-width bits or a canonical Huffman code (``coding``).

Layout and gap width b are chosen per tensor by the exact coded size. Biases, norms and buffers
are stored raw. The file is ``b"BSDC" | u32 version | u32 header bytes | zlib(JSON header) |
payload``; :func:`save_encoded` writes it atomically, reads it back, decodes it and checks that
every tensor is equal to the original (NaN where NaN; -0.0 may come back as 0.0) before reporting
its size on disk::

    >>> f = save_encoded(model, "out/model.bsdc")          # coding="huffman", values="codebook"
    >>> f.bytes_on_disk, f.dense_bytes                     # real file sizes
    >>> state = load_encoded("out/model.bsdc")             # model.load_state_dict(state)
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_open
from ..errors import ConfigError, FormatError
from .huffman import code_lengths, decode, encode, encoded_bits, pack_fixed, unpack_fixed

MAGIC, VERSION = b"BSDC", 1
MAX_CODEBOOK = 256
GAP_BITS = range(1, 13)


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(b: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not b:
        return torch.empty(shape if -1 not in shape else [0], dtype=dtype)
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def _width(alphabet: int) -> int:
    return max(1, math.ceil(math.log2(max(alphabet, 2))))


def _stream_bits(symbols_hist: np.ndarray, coding: str, alphabet: int) -> int:
    """Exact bits of one integer stream (Huffman: bitstream + one length byte per symbol)."""
    n = int(symbols_hist.sum())
    if n == 0:
        return 0
    if coding == "fixed":
        return 8 * math.ceil(n * _width(alphabet) / 8)
    lengths = code_lengths(symbols_hist)
    return 8 * (math.ceil(encoded_bits(symbols_hist, lengths) / 8) + alphabet)


class _Writer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def put(self, data: bytes) -> list[int]:
        off = self.buf.tell()
        self.buf.write(data)
        return [off, len(data)]

    def stream(self, symbols: np.ndarray, alphabet: int, coding: str) -> dict[str, Any]:
        if coding == "fixed":
            w = _width(alphabet)
            return {"c": "f", "n": len(symbols), "w": w, "at": self.put(pack_fixed(symbols, w))}
        lengths = code_lengths(np.bincount(symbols, minlength=alphabet)) if len(symbols) else \
            np.zeros(alphabet, np.uint8)
        lens_at = self.put(lengths.tobytes())
        return {"c": "h", "n": len(symbols), "a": alphabet, "lens": lens_at,
                "at": self.put(encode(symbols, lengths) if len(symbols) else b"")}


def _read_stream(payload: memoryview, s: dict[str, Any]) -> np.ndarray:
    off, nb = s["at"]
    data = bytes(payload[off: off + nb])
    if s["c"] == "f":
        return unpack_fixed(data, s["w"], s["n"])
    lo, ln = s["lens"]
    return decode(data, np.frombuffer(bytes(payload[lo: lo + ln]), dtype=np.uint8), s["n"])


def _sparse_streams(pos: np.ndarray, sym: np.ndarray, b: int, filler: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative indexing: (gap stream, value stream) with fillers for gaps > 2^b - 1."""
    G = (1 << b) - 1
    gaps = np.diff(pos, prepend=-1) - 1  # (nnz,) zeros before each nonzero
    fill, rem = gaps // (G + 1), gaps % (G + 1)
    owner = np.repeat(np.arange(len(pos)), fill + 1)  # (entries,) the nonzero each entry leads to
    real = np.r_[owner[1:] != owner[:-1], True] if len(owner) else np.zeros(0, bool)  # last entry of a run
    return np.where(real, rem[owner], G), np.where(real, sym[owner], filler)


def _sparse_bits(gaps: np.ndarray, sym_hist: np.ndarray, b: int, coding: str, raw_value_bits: int) -> int:
    """Exact bits of the gap and value streams of the sparse layout with gap width b."""
    G = (1 << b) - 1
    fill, rem = gaps // (G + 1), gaps % (G + 1)
    gap_hist = np.bincount(rem, minlength=G + 1)
    gap_hist[G] += int(fill.sum())
    entries = int(sym_hist.sum() + fill.sum())
    if raw_value_bits:
        return _stream_bits(gap_hist, coding, G + 1) + 8 * math.ceil(entries * raw_value_bits / 8)
    vals_hist = np.r_[sym_hist, int(fill.sum())]  # the filler symbol is `alphabet`
    return _stream_bits(gap_hist, coding, G + 1) + _stream_bits(vals_hist, coding, len(vals_hist))


def _encode_weight(w: torch.Tensor, wr: _Writer, values: str, coding: str) -> dict[str, Any]:
    flat = w.detach().cpu().reshape(-1)  # (numel,)
    nz = flat != 0
    pos = torch.nonzero(nz).reshape(-1).numpy()  # (nnz,) flat positions of the nonzeros
    entry: dict[str, Any] = {"k": "w", "dt": str(w.dtype).removeprefix("torch."), "s": list(w.shape)}
    esize = flat.element_size()
    nz_uniq = torch.unique(flat[nz])  # sparse codebook: distinct nonzero values, sorted
    use_cb = values == "codebook" and nz_uniq.numel() < MAX_CODEBOOK and bool(torch.isfinite(nz_uniq).all())
    if use_cb:
        dense_cb = torch.unique(flat)  # dense codebook: 0 included if present
        dense_sym = torch.searchsorted(dense_cb, flat).numpy()
        sym = torch.searchsorted(nz_uniq, flat[nz]).numpy()
        dense_bits = _stream_bits(np.bincount(dense_sym, minlength=len(dense_cb)), coding, len(dense_cb)) \
            + 8 * esize * len(dense_cb)
        sym_hist, raw_bits, extra = np.bincount(sym, minlength=len(nz_uniq)), 0, 8 * esize * len(nz_uniq)
    else:
        dense_bits, sym_hist, raw_bits, extra = flat.numel() * esize * 8, np.array([len(pos)]), esize * 8, 0
    gaps = np.diff(pos, prepend=-1) - 1
    options = [(dense_bits, 0)] + [(_sparse_bits(gaps, sym_hist, b, coding, raw_bits) + extra, b)
                                   for b in GAP_BITS]
    if use_cb:  # a codebook of (almost) all-distinct values can cost more than the raw values
        options.append((flat.numel() * esize * 8, -1))
    b = min(options)[1]  # 0 = dense layout with a codebook, -1 = raw dense values
    entry["lay"] = "sparse" if b > 0 else "dense"
    if b <= 0:
        if b == 0 and use_cb:
            entry["cb"] = wr.put(_raw(dense_cb))
            entry["v"] = wr.stream(dense_sym, len(dense_cb), coding)
        else:
            entry["raw"] = wr.put(_raw(flat))
        return entry
    entry["gb"] = b
    if use_cb:
        gap_s, vals = _sparse_streams(pos, sym, b, len(nz_uniq))
        entry["cb"] = wr.put(_raw(nz_uniq))
        entry["v"] = wr.stream(vals, len(nz_uniq) + 1, coding)
    else:
        gap_s, owner = _sparse_streams(pos, np.arange(len(pos)), b, -1)
        v = torch.zeros(len(gap_s), dtype=flat.dtype)  # fillers store a zero, as in the paper
        v[torch.from_numpy(owner >= 0)] = flat[torch.from_numpy(pos)]
        entry["raw"] = wr.put(_raw(v))
    entry["g"] = wr.stream(gap_s, 1 << b, coding)
    return entry


def _raw_len(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _decode_weight(e: dict[str, Any], payload: memoryview) -> torch.Tensor:
    dtype, shape = getattr(torch, e["dt"]), e["s"]
    numel = math.prod(shape)

    def chunk(at: list[int]) -> bytes:
        return bytes(payload[at[0]: at[0] + at[1]])

    cb = _from_raw(chunk(e["cb"]), dtype, [-1]) if "cb" in e else None
    if e["lay"] == "dense":
        if cb is None:
            return _from_raw(chunk(e["raw"]), dtype, shape)
        return cb[torch.from_numpy(_read_stream(payload, e["v"]))].reshape(shape)
    gaps = _read_stream(payload, e["g"])
    pos = torch.from_numpy(np.cumsum(gaps + 1) - 1)  # (entries,) flat position of every entry
    flat = torch.zeros(numel, dtype=dtype)
    if cb is None:
        v = _from_raw(chunk(e["raw"]), dtype, [-1])
        real = v != 0
        flat[pos[real]] = v[real]
    else:
        sym = torch.from_numpy(_read_stream(payload, e["v"]))
        real = sym < cb.numel()
        flat[pos[real]] = cb[sym[real]]
    return flat.reshape(shape)


def encode_state(state: dict[str, torch.Tensor], values: str = "codebook", coding: str = "huffman") -> bytes:
    """The file bytes for a state_dict (see the module docstring).

    values: ``"codebook"`` (weights with <= 255 distinct nonzero values are stored as indices)
    or ``"raw"``; coding: ``"huffman"`` or ``"fixed"``.
    """
    if values not in ("codebook", "raw") or coding not in ("huffman", "fixed"):
        raise ConfigError(f"encode_state: values must be 'codebook' or 'raw' and coding 'huffman' or "
                          f"'fixed', got values={values!r}, coding={coding!r}")
    wr, entries = _Writer(), {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"encode_state: {name!r} is a {type(t).__name__}, not a tensor")
        if t.is_floating_point() and t.dim() >= 2:
            entries[name] = _encode_weight(t, wr, values, coding)
        else:
            entries[name] = {"k": "raw", "dt": str(t.dtype).removeprefix("torch."), "s": list(t.shape),
                             "raw": wr.put(_raw(t))}
    header = zlib.compress(json.dumps({"tensors": entries}, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<II", VERSION, len(header)) + header + wr.buf.getvalue()


def decode_state(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`: the state_dict, equal to the encoded one."""
    if data[:4] != MAGIC or len(data) < 12:
        raise FormatError("not a brainsurgeon Deep Compression file (bad magic); expected a .bsdc file "
                          "written by brainsurgeon.share.save_encoded")
    version, hlen = struct.unpack("<II", data[4:12])
    if version != VERSION:
        raise FormatError(f"encoded file version {version} is not supported (this brainsurgeon reads {VERSION})")
    try:
        entries = json.loads(zlib.decompress(data[12: 12 + hlen]))["tensors"]
    except (zlib.error, ValueError, KeyError) as e:
        raise FormatError(f"encoded file header is corrupt or truncated: {e}") from e
    payload = memoryview(data)[12 + hlen:]
    out = {}
    for name, e in entries.items():
        if e["k"] == "raw":
            off, nb = e["raw"]
            out[name] = _from_raw(bytes(payload[off: off + nb]), getattr(torch, e["dt"]), e["s"])
        else:
            out[name] = _decode_weight(e, payload)
    return out


@dataclass
class EncodedFile:
    """A written, verified encoded file: its real size on disk and the dense fp baseline."""

    path: str
    bytes_on_disk: int
    dense_bytes: int  # raw bytes of every tensor of the state_dict (what an uncompressed file holds)
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # payload bytes per tensor

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.bytes_on_disk, 1)


def _state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return {k: v.detach() for k, v in model_or_state.state_dict().items()}
    return dict(model_or_state)


def save_encoded(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike[str],
                 values: str = "codebook", coding: str = "huffman") -> EncodedFile:
    """Encode, write atomically, read back, decode and verify equality; returns the real file size.

    >>> f = save_encoded(model, "out/model.bsdc")
    >>> f"{f.bytes_on_disk} bytes, {f.ratio:.1f}x smaller than {f.dense_bytes}"
    """
    state = _state(model_or_state)
    data = encode_state(state, values, coding)
    with atomic_open(path, "wb") as f:
        f.write(data)
    back = load_encoded(path)
    for name, t in state.items():
        u, t = back.get(name), t.cpu()
        same = u is not None and u.dtype == t.dtype and u.shape == t.shape and (
            torch.equal(u, t) or (t.is_floating_point() and bool(((u == t) | (u.isnan() & t.isnan())).all())))
        if not same:
            raise FormatError(f"save_encoded: tensor {name!r} did not survive the round trip through {path}; "
                              f"this is a bug, please report it")
    entries = json.loads(zlib.decompress(data[12: 12 + struct.unpack("<II", data[4:12])[1]]))["tensors"]
    return EncodedFile(str(path), os.path.getsize(path), sum(_raw_len(t) for t in state.values()),
                       {n: _entry_bytes(e) for n, e in entries.items()})


def _entry_bytes(e: dict[str, Any]) -> int:
    total = 0
    for key in ("raw", "cb"):
        if key in e:
            total += e[key][1]
    for key in ("v", "g"):
        if key in e:
            total += e[key]["at"][1] + (e[key]["lens"][1] if "lens" in e[key] else 0)
    return total


def load_encoded(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_encoded` back into a state_dict.

    >>> model.load_state_dict(load_encoded("out/model.bsdc"))
    """
    with open(path, "rb") as f:
        return decode_state(f.read())
