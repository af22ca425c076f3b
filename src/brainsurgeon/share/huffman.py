"""Huffman coding (Huffman, Proc. IRE 1952) with canonical codes, plus fixed-width bit packing.

Deep Compression codes both the cluster indices and the sparse-index gaps with Huffman codes
(Han et al., ICLR 2016, sec. 4). Codes are canonical, so a code is fully described by its
code lengths (one byte per symbol of the alphabet); lengths are capped at :data:`MAX_LEN` bits so
the decoder can use one lookup table of ``2^MAX_LEN`` entries::

    >>> lengths = code_lengths(np.bincount(symbols, minlength=16))
    >>> data = encode(symbols, lengths)                  # bytes
    >>> assert (decode(data, lengths, len(symbols)) == symbols).all()
    >>> packed = pack_fixed(symbols, width=4); unpack_fixed(packed, 4, len(symbols))
"""

from __future__ import annotations

import heapq

import numpy as np

from ..errors import FormatError

MAX_LEN = 16


def _lengths_unlimited(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths of the symbols with count > 0 (0 for unused symbols)."""
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    # heap of (count, tie-break, [symbols in the subtree]); merging deepens every member by one
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        lengths[a] += 1
        lengths[b] += 1
        heapq.heappush(heap, (c1 + c2, tie, a + b))
        tie += 1
    return lengths


def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths (uint8 per symbol, 0 = unused) for symbol `counts`, at most `max_len` bits.

    Past `max_len`, counts are flattened (halved, rounded up) until the tree fits: the codes stay
    prefix-free and optimal for the flattened counts.

    >>> code_lengths(np.array([8, 4, 2, 1, 1])).tolist()
    [1, 2, 3, 4, 4]
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() == 0:
        raise FormatError("code_lengths: counts must be a 1-D array of non-negative counts with a positive sum")
    if np.count_nonzero(counts) > 2 ** max_len:
        raise FormatError(f"code_lengths: {np.count_nonzero(counts)} symbols do not fit codes of <= {max_len} bits")
    lengths = _lengths_unlimited(counts)
    while lengths.max() > max_len:
        counts = np.where(counts > 0, (counts + 1) // 2, 0)
        lengths = _lengths_unlimited(counts)
    return lengths.astype(np.uint8)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (int64) for code lengths: shorter codes first, then by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths).tolist(), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s] = code
        prev = int(lengths[s])
        code += 1
    return codes


def _bits_of(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The MSB-first bits of each value in its width, concatenated: (sum(widths),) uint8."""
    widths = widths.astype(np.int64)
    out = np.zeros(int(widths.sum()), dtype=np.uint8)
    start = np.cumsum(widths) - widths  # (n,) first bit of each value
    for j in range(int(widths.max(initial=0))):
        sel = widths > j
        out[start[sel] + j] = (values[sel] >> (widths[sel] - 1 - j)) & 1
    return out


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """The Huffman bitstream of `symbols` (MSB first, zero-padded to a byte).

    >>> encode(np.array([0, 1, 0]), np.array([1, 1], dtype=np.uint8))
    b'@'
    """
    symbols = np.asarray(symbols, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= len(lengths) or (lengths[symbols] == 0).any()):
        raise FormatError("huffman.encode: a symbol has no code (outside the alphabet or with count 0)")
    codes = canonical_codes(lengths)
    return np.packbits(_bits_of(codes[symbols], lengths[symbols])).tobytes()


def decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode `count` symbols from a bitstream written by :func:`encode` with the same lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    L = int(lengths.max(initial=0))
    if L == 0 or L > MAX_LEN:
        raise FormatError(f"huffman.decode: code lengths must be in [1, {MAX_LEN}], got max {L}")
    codes = canonical_codes(lengths)
    sym_table = np.full(2 ** L, -1, dtype=np.int64)  # every L-bit window -> the symbol whose code prefixes it
    len_table = np.zeros(2 ** L, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (L - int(lengths[s]))
        sym_table[lo: lo + (1 << (L - int(lengths[s])))] = s
        len_table[lo: lo + (1 << (L - int(lengths[s])))] = lengths[s]
    bits = np.concatenate([np.unpackbits(np.frombuffer(data, dtype=np.uint8)), np.zeros(L, np.uint8)])
    n = len(bits) - L
    window = np.zeros(n, dtype=np.int64)  # window[p] = the L bits starting at p, as an integer
    for j in range(L):
        window = (window << 1) | bits[j: j + n]
    syms, lens = sym_table[window].tolist(), len_table[window].tolist()
    out = [0] * count
    p = 0
    try:
        for i in range(count):
            out[i] = syms[p]
            p += lens[p]
    except IndexError as e:
        raise FormatError(f"huffman.decode: the bitstream ends after {i} of {count} symbols (truncated file)") from e
    if p > n or min(out) < 0:
        raise FormatError("huffman.decode: invalid bitstream (a code that is not in the table, or truncated)")
    return np.asarray(out, dtype=np.int64)


def encoded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits of the Huffman bitstream for symbol `counts` (without the byte padding)."""
    return int((np.asarray(counts, dtype=np.int64) * np.asarray(lengths, dtype=np.int64)).sum())


def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers in `width` bits each, MSB first, zero-padded to a byte.

    >>> pack_fixed(np.array([1, 2, 3]), 2)
    b'l'
    """
    values = np.asarray(values, dtype=np.int64)
    if len(values) and (values.min() < 0 or values.max() >= 1 << width):
        raise FormatError(f"pack_fixed: values must be in [0, 2^{width}), got [{values.min()}, {values.max()}]")
    return np.packbits(_bits_of(values, np.full(len(values), width))).tobytes()


def unpack_fixed(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_fixed`: `count` integers of `width` bits."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(bits) < count * width:
        raise FormatError(f"unpack_fixed: {len(bits)} bits hold fewer than {count} values of {width} bits "
                          f"(truncated file)")
    b = bits[: count * width].reshape(count, width).astype(np.int64)  # (count, width), MSB first
    return b @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
