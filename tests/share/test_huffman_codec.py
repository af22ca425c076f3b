"""share.huffman and share.codec: lossless round trips, shorter than fixed width, honest file sizes."""

import os

import numpy as np
import pytest
import torch

from brainsurgeon.errors import FormatError
from brainsurgeon.share import cluster_weight, decode_state, encode_state, load_encoded, save_encoded
from brainsurgeon.share.huffman import (
    MAX_LEN,
    canonical_codes,
    code_lengths,
    decode,
    encode,
    pack_fixed,
    unpack_fixed,
)


def skewed(n: int, alphabet: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.geometric(0.35, size=n) - 1, alphabet - 1)


@pytest.mark.parametrize("alphabet", [2, 16, 257])
def test_huffman_round_trip_is_lossless_and_beats_fixed_width_on_skewed_data(alphabet):
    s = skewed(20000, alphabet)
    lengths = code_lengths(np.bincount(s, minlength=alphabet))
    data = encode(s, lengths)
    np.testing.assert_array_equal(decode(data, lengths, len(s)), s)
    fixed = pack_fixed(s, int(np.ceil(np.log2(alphabet))))
    assert len(data) < len(fixed) if alphabet > 2 else len(data) == len(fixed)  # 1 bit is optimal for 2
    np.testing.assert_array_equal(unpack_fixed(fixed, int(np.ceil(np.log2(alphabet))), len(s)), s)


def test_code_lengths_are_a_complete_prefix_code_and_capped():
    for counts in (np.array([8, 4, 2, 1, 1]), np.bincount(skewed(5000, 40)), np.array([1] * 300 + [10 ** 12]),
                   np.array([2 ** i for i in range(40)])):
        L = code_lengths(counts).astype(np.int64)
        used = L[L > 0]
        assert used.max() <= MAX_LEN
        assert sum(2.0 ** -used) == pytest.approx(1.0)  # Kraft equality: complete, prefix-free
        codes = canonical_codes(L)
        words = {format(int(codes[i]), f"0{L[i]}b") for i in np.flatnonzero(L)}
        assert not any(a != b and b.startswith(a) for a in words for b in words)
    assert code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]  # one used symbol: a 1-bit code


def test_huffman_rejects_symbols_without_code_and_truncated_streams():
    lengths = code_lengths(np.array([5, 5, 0]))
    with pytest.raises(FormatError, match="has no code"):
        encode(np.array([2]), lengths)
    data = encode(np.array([0, 1] * 50), lengths)
    with pytest.raises(FormatError, match="truncated|invalid"):
        decode(data[:3], lengths, 100)


def test_huffman_size_matches_entropy_bound():
    s = skewed(50000, 32, seed=1)
    counts = np.bincount(s, minlength=32)
    p = counts[counts > 0] / counts.sum()
    entropy_bits = -(counts[counts > 0] * np.log2(p)).sum()
    nbits = 8 * len(encode(s, code_lengths(counts)))
    assert entropy_bits <= nbits <= entropy_bits + len(s) + 8  # H <= L < H + 1 per symbol


def _state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 300, generator=g)
    W[W.abs() < 1.5] = 0  # ~87% pruned
    W = cluster_weight(W, 4).weight()
    run = torch.zeros(8, 5000)
    run[0, 3], run[7, 4990] = 1.5, -2.0  # gaps far longer than any gap width: fillers
    return {"fc.weight": W, "fc.bias": torch.randn(48, generator=g), "conv.weight": torch.randn(6, 3, 3, 3,
            generator=g), "bn.num_batches_tracked": torch.tensor(7), "half.weight": torch.randn(4, 4).half(),
            "long_runs.weight": run, "empty.weight": torch.zeros(0, 3), "mask": torch.rand(3, 3) > 0.5,
            "dense_shared.weight": cluster_weight(torch.randn(32, 32, generator=g), 3).weight().double()}


@pytest.mark.parametrize("values,coding", [("raw", "fixed"), ("codebook", "fixed"), ("codebook", "huffman")])
def test_encoded_file_round_trip_is_bit_identical_and_size_is_the_file_size(tmp_path, values, coding):
    state = _state()
    path = tmp_path / "m.bsdc"
    f = save_encoded(state, path, values, coding)
    assert f.bytes_on_disk == os.path.getsize(path) == len(encode_state(state, values, coding))
    back = load_encoded(path)
    assert list(back) == list(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    assert f.dense_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert f.bytes_on_disk > sum(f.tensor_bytes.values())  # the header is counted too


def test_each_stage_is_smaller_than_the_previous(tmp_path):
    state = _state()
    sizes = [save_encoded(state, tmp_path / f"{i}.bsdc", v, c).bytes_on_disk
             for i, (v, c) in enumerate([("raw", "fixed"), ("codebook", "fixed"), ("codebook", "huffman")])]
    dense = sum(t.numel() * t.element_size() for t in state.values())
    assert dense > sizes[0] > sizes[1] > sizes[2]


def test_corrupt_files_raise_format_errors(tmp_path):
    data = encode_state(_state())
    with pytest.raises(FormatError, match="bad magic"):
        decode_state(b"NOPE" + data[4:])
    with pytest.raises(FormatError, match="header is corrupt"):
        decode_state(data[:12] + b"\x00" * 20 + data[32:])
    with pytest.raises(FormatError):
        decode_state(data[: len(data) // 2])


def test_non_finite_weights_round_trip(tmp_path):
    W = torch.zeros(4, 6)
    W[0, 1], W[2, 3], W[3, 5] = float("nan"), float("inf"), -1.5
    f = save_encoded({"w": W}, tmp_path / "nf.bsdc")
    back = load_encoded(tmp_path / "nf.bsdc")["w"]
    assert torch.equal(back.isnan(), W.isnan()) and torch.equal(back[~W.isnan()], W[~W.isnan()])
    assert f.bytes_on_disk == os.path.getsize(tmp_path / "nf.bsdc")
