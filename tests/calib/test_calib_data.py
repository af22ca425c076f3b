"""calib.data: every accepted batch shape becomes (args, kwargs); clear errors otherwise."""

import pytest
import torch
from torch import nn

from brainsurgeon._modes import eval_mode
from brainsurgeon.calib import cache_batches, iter_batches, move_to
from brainsurgeon.errors import CalibrationError


def test_tensor_tuple_and_dict_batches():
    x = torch.randn(2, 3)
    y = torch.tensor([0, 1])
    got = list(iter_batches([x, (x, y), [x, y], {"input_ids": x, "labels": y}]))
    assert got[0][0][0] is x and got[0][1] == {}
    assert got[1][0] == (x,) and got[2][0] == (x,)
    assert got[3] == ((), {"input_ids": x})


def test_callable_is_called_per_pass_and_max_batches():
    data = [torch.full((1,), float(i)) for i in range(5)]
    got = list(iter_batches(lambda: data, max_batches=2))
    assert [a[0].item() for a, _ in got] == [0.0, 1.0]
    assert len(list(iter_batches(lambda: data))) == 5  # re-callable


def test_single_tensor_is_one_batch():
    x = torch.randn(4, 3)
    (args, kwargs), = list(iter_batches(x))
    assert args[0] is x


@pytest.mark.parametrize("calib", [[], None, iter([])])
def test_empty_calibration_raises_with_fix(calib):
    with pytest.raises(CalibrationError, match="calibration data is empty; pass a DataLoader"):
        list(iter_batches(calib))


def test_unsupported_batch_type_names_the_type():
    with pytest.raises(CalibrationError, match="batch 1 has unsupported type str"):
        list(iter_batches([torch.ones(1), "text"]))


def test_dataloader_of_pairs():
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    shapes = [a[0].shape[0] for a, _ in iter_batches(loader)]
    assert shapes == [4, 4, 2]


def test_cache_batches_reads_one_shot_iterators_once():
    gen = (torch.randn(2, 3) for _ in range(3))
    cached = cache_batches(gen)
    assert len(cached) == 3
    assert len(list(iter_batches(cached))) == 3 == len(list(iter_batches(cached)))
    assert len(list(iter_batches(cached, max_batches=2))) == 2


def test_move_to_nested():
    x = torch.ones(1)
    out = move_to(((x, [x]), {"a": x, "b": 3}), "cpu")
    assert out[0][0].device.type == "cpu" and out[1]["b"] == 3 and isinstance(out[0][1], list)


def test_eval_forwards_runs_each_batch_in_eval_and_gives_every_flag_back_even_on_error():
    from brainsurgeon.calib.data import eval_forwards

    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a mixed state, restored module by module
    seen, calls = [], []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, m[1].training)))
    assert eval_forwards(model, [torch.randn(2, 3) for _ in range(3)], each=lambda: calls.append(1)) == 3
    assert seen == [(False, False)] * 3 and len(calls) == 3
    assert (model.training, model[0].training, model[1].training) == (True, False, True)
    with pytest.raises(RuntimeError):
        eval_forwards(model, [torch.randn(2, 4)])  # wrong width: the forward raises
    assert (model.training, model[0].training, model[1].training) == (True, False, True)
    assert eval_forwards(model, [torch.randn(2, 3) for _ in range(5)], max_batches=2) == 2


def test_eval_mode_gives_each_submodule_its_flag_back_also_on_error():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2)))
    m.train()
    m[1].eval()
    before = [s.training for s in m.modules()]
    with pytest.raises(RuntimeError, match="boom"), eval_mode(m):
        assert not any(s.training for s in m.modules())
        raise RuntimeError("boom")
    assert [s.training for s in m.modules()] == before == [True, True, False, True, True]
