"""The rollback snapshot is copy-on-write: it copies only what a verb writes in place, and restores everything."""

import pytest
import torch
from reliability_state import assert_untouched, capture
from torch import nn

import brainsurgeon as bs
from brainsurgeon import api
from brainsurgeon._state import ModelSnapshot
from brainsurgeon.errors import NumericalError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.BatchNorm1d(4)).eval()


def _kept(snap):
    return sum(e[2] is not None for e in snap.tensors.values())


def test_snapshot_copies_nothing_until_a_tensor_is_kept():
    m = _net()
    before = capture(m)
    snap = ModelSnapshot(m)
    assert _kept(snap) == 0
    snap.write_(m[0].weight, torch.zeros(16, 8))  # new storage: nothing copied
    assert _kept(snap) == 0 and torch.count_nonzero(m[0].weight) == 0
    snap.keep([m[3].running_mean, m[3].running_mean])  # once, however often asked
    assert _kept(snap) == 1
    m[3].running_mean.add_(1.0)
    m[2].weight.data = m[2].weight.data[:2].clone()  # surgery: new .data, the old storage is untouched
    snap.keep([m[2].weight])
    assert _kept(snap) == 1
    m[0].bias.data = m[0].bias.data[:8]  # a view still writes into the old storage: kept
    snap.keep([m[0].bias])
    m[0].bias.data.zero_()
    assert _kept(snap) == 2
    snap.restore_()
    assert_untouched(m, before)


def test_write_keeps_a_tie_and_writes_it_in_place():
    m = _net()
    m[2].extra = nn.Parameter(m[2].weight.data)  # two Parameter objects, one storage
    snap = ModelSnapshot(m)
    old = m[2].weight.detach().clone()
    snap.write_(m[2].weight, torch.ones(4, 16))
    assert torch.equal(m[2].extra, torch.ones(4, 16))  # still tied
    assert _kept(snap) == 1
    snap.restore_()
    assert torch.equal(m[2].weight, old) and torch.equal(m[2].extra, old)


def test_rtn_step_copies_no_weight_and_a_failure_restores_it(monkeypatch):
    m = _net()
    before = capture(m)
    made = []
    real = api.ModelSnapshot

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(api, "ModelSnapshot", spy)
    w0 = m[0].weight
    bs.quantize_(m, bs.RTN(bits=4), None)
    assert _kept(made[0]) == 0 and m[0].weight is w0 and len(m[0].weight.unique()) <= 16 * 16
    m = _net()
    before = capture(m)
    calls = []
    real_cw = api.compress_weight

    def fail(W, H, cfg, name=""):
        calls.append(name)
        if len(calls) == 2:
            raise NumericalError("injected failure after the first layer was written")
        return real_cw(W, H, cfg, name)

    monkeypatch.setattr(api, "compress_weight", fail)
    with pytest.raises(NumericalError, match="injected"):
        bs.quantize_(m, bs.RTN(bits=2), None)
    assert calls == ["0", "2"]
    assert_untouched(m, before)


class Counting(nn.Module):
    """A custom layer that counts its calls in a buffer, even in eval mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_a_buffer_written_by_a_calibration_forward_is_restored_on_failure():
    torch.manual_seed(0)
    m = nn.Sequential(Counting(), nn.ReLU(), nn.Linear(8, 4)).eval()
    before = capture(m)
    with pytest.raises(bs.errors.BrainsurgeonError, match="group size 7"):  # strict: no layer can take 3:7
        bs.sparsify_(m, bs.ExactOBS(pattern="3:7"), [torch.randn(4, 8) for _ in range(2)],
                     options=bs.CalibOptions(strict=True))
    assert_untouched(m, before)
