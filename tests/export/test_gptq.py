"""GPTQ-format export, checked by an independent unpacking written from the format's description.

No GPTQ consumer runs here on CPU without extra installs (transformers needs optimum + gptqmodel);
the reference below follows AutoGPTQ's documented v1 layout, bit by bit, with plain Python loops.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from serving_fixtures import compressed, logits

import brainsurgeon as bs
from brainsurgeon.errors import FormatError
from brainsurgeon.export.gptq import load_gptq, save_gptq
from brainsurgeon.export.layercodes import collect_codes

pytest.importorskip("transformers")


def _reference_weight(qweight, qzeros, scales, g_idx, bits):
    """Spec: qweight[i, n] holds codes of input rows i*p .. i*p+p-1 (low bits first); qzeros[g, j] holds zero-1
    of output columns j*p ..; W[n, k] = scales[g_idx[k], n] * (code - zero). Python loops, no shared helper."""
    p, mask = 32 // bits, 2**bits - 1
    K, N = qweight.shape[0] * p, qweight.shape[1]
    qw, qz = qweight.tolist(), qzeros.tolist()
    W = torch.empty(N, K)
    for k in range(K):
        g = int(g_idx[k])
        for n in range(N):
            code = ((qw[k // p][n] & 0xFFFFFFFF) >> (bits * (k % p))) & mask
            zero = (((qz[g][n // p] & 0xFFFFFFFF) >> (bits * (n % p))) & mask) + 1
            W[n, k] = float(scales[g, n]) * (code - zero)
    return W


@pytest.mark.parametrize("kind", ["w4g128", "w8", "2:4+w4g128", "w4g64a"])
def test_reference_unpacking_gives_our_weights(tmp_path, kind):
    model, quant = compressed(kind)
    d = str(tmp_path / "gptq")
    save_gptq(model, d, quant=quant)
    qc = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["checkpoint_format"], qc["desc_act"]) == ("gptq", quant.bits, "gptq",
                                                                                         False)
    assert qc["sym"] == quant.sym
    sd = load_file(os.path.join(d, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"  # 256 inputs: two groups of 128 when g128
    lc = collect_codes(model, quant)[name]
    t = {k: sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
    assert t["qweight"].shape == (256 * quant.bits // 32, 128)
    assert torch.equal(t["g_idx"], (torch.arange(256) // lc.codes.group_size).int())
    c = lc.codes
    want = c.scale.half().float().repeat_interleave(c.group_size, 1) * (c.q - c.zero.repeat_interleave(c.group_size, 1))
    assert torch.equal(_reference_weight(**t, bits=quant.bits), want)
    ref = logits(model)
    again = load_gptq(d)
    assert (logits(again) - ref).abs().max() < 2e-3  # float16 scales
    assert torch.equal(logits(bs.load(d)), logits(again))


def test_refusals_before_writing(tmp_path):
    model, _ = compressed("w4g128")
    with pytest.raises(FormatError, match="no quantized Linear"):
        save_gptq(model, str(tmp_path / "g"))
    m3, q3 = compressed("w3g128")
    with pytest.raises(FormatError, match="3-bit codes.*compressed-tensors"):
        save_gptq(m3, str(tmp_path / "g"), quant=q3)
    assert not os.path.exists(tmp_path / "g")
