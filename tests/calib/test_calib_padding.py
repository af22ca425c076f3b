"""calib: padded calibration batches (attention_mask) put only the real tokens' rows into the Hessians."""

import pytest
import torch
from torch import nn

from brainsurgeon.calib import HessianAccumulator, auto_shrinkage, run_layerwise
from brainsurgeon.calib.padding import batch_index, token_masks
from brainsurgeon.config import CalibOptions


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.fc = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, attention_mask):
        att = (self.q(h) @ self.k(h).transpose(-1, -2)).masked_fill(~attention_mask[:, None, :].bool(), float("-inf"))
        return h + self.fc(att.softmax(-1) @ h)


class PaddedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))  # a chain: replayed from its cache
        self.head = nn.Linear(8, 3)

    def forward(self, x, attention_mask):
        h = self.embed(x)
        for blk in self.layers:
            h = blk(h, attention_mask)
        return self.head(h + self.mlp(h))


def padded_calib():
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths in ((6, 2, 4), (3, 6, 1)):
        mask = torch.zeros(3, 6, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        out.append({"x": torch.randn(3, 6, 5, generator=g), "attention_mask": mask})
    return out


def reference(model, calib, names):
    """H of each layer from the real tokens' rows only, by plain hooks (float64)."""
    rows = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: rows[n].append(a[0][state["mask"]].double())) for n in names]
    state = {}
    with torch.no_grad():
        for b in calib:
            state["mask"] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    return {n: (lambda X: 2 * X.T @ X / len(X))(torch.cat(r)) for n, r in rows.items()}


@pytest.mark.parametrize("options", [CalibOptions(mode="dense"), CalibOptions(mode="sequential"),
                                     CalibOptions(blocks="layers")])
def test_padding_rows_stay_out_of_every_hessian(options):
    torch.manual_seed(0)
    model, calib = PaddedLM(), padded_calib()
    names = ["layers.0.q", "layers.0.fc", "layers.1.k", "layers.1.fc"] + (
        [] if options.blocks else ["mlp.0", "mlp.2", "head"])
    seen = {}
    run_layerwise(model, names, calib, lambda n, m, H: seen.__setitem__(n, H.clone()), options)
    want = reference(model, calib, names)
    for n in names:
        torch.testing.assert_close(seen[n].double(), want[n], rtol=1e-5, atol=1e-6)


def test_ragged_spread_and_folds_are_per_real_sample():
    """auto shrinkage and the held-out folds count samples of their real lengths (padding removed)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 12, generator=g)
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    calls = []
    with token_masks() as masks, batch_index(0), auto_shrinkage(
            lambda n: True, lambda n, m, folds, lam: calls.append((folds, lam)) or lam) as applied:
        masks.append(mask)
        acc = HessianAccumulator("fc", nn.Linear(12, 2))
        acc.add_input(x)
        H = acc.H
    xs = [x[i, :int(mask[i].sum())].double() for i in range(4)]
    assert acc.n == 11
    X = torch.cat(xs)
    raw = 2 * X.T @ X / 11
    # Schaefer-Strimmer on the real samples (brute force: every per-sample H_b, standardised by the batch)
    Hb = torch.stack([2.0 / len(s) * s.T @ s for s in xs])
    d = X.square().sum(0).rsqrt()
    R = Hb * d[:, None] * d
    off = ~torch.eye(12, dtype=torch.bool)
    var = ((R - R.mean(0)) ** 2).sum(0)[off].sum() / 3 / 4
    lam = min(float(var / R.mean(0)[off].square().sum()), 1.0)
    assert applied == [("fc", pytest.approx(lam, rel=1e-4))] and calls[0][1] == pytest.approx(lam, rel=1e-4)
    (HA, HB), _ = calls[0][0]
    even, odd = torch.cat(xs[0::2]), torch.cat(xs[1::2])
    torch.testing.assert_close(HA, 2 * even.T @ even / len(even), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(HB, 2 * odd.T @ odd / len(odd), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(H.double(), (1 - lam) * raw + lam * torch.diag(raw.diagonal()), rtol=1e-4, atol=1e-6)


def test_without_a_mask_or_outside_the_driver_every_row_counts():
    x = torch.randn(2, 3, 4)
    for ctx_mask in (None, torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool)):
        with token_masks() as masks, batch_index(0):
            masks.append(ctx_mask)
            acc = HessianAccumulator("fc", nn.Linear(4, 2))
            acc.add_input(x)
        assert acc.n == 6  # no mask, all real, or a mask of another shape: all rows
