"""Bugs 13.#12 (the manifest is covered by verify=True; specs are checked before allocating) and
13.#15 (a user's subclass of nn.Conv2d is pruned, saved and loaded back, keeping its class)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import FormatError
from brainsurgeon.export import load, save


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _edit(ck, fn):
    p = os.path.join(ck, "manifest.json")
    man = json.load(open(p))
    fn(man)
    json.dump(man, open(p, "w"))


@pytest.fixture
def ck(tmp_path):
    return save(Net(), str(tmp_path / "ck"))


@pytest.mark.parametrize("edit", [
    lambda m: m["attrs"].setdefault("conv1", {}).update(stride=2),
    lambda m: m["modules"]["conv1"]["spec"].update(stride=[2, 2]),
    lambda m: m["aliases"].update({"conv2.weight": "conv1.weight"}),
    lambda m: m.update(recipe={"brainsurgeon_recipe": 1}),
])
def test_an_edited_manifest_is_refused_by_verify(ck, edit):
    _edit(ck, edit)
    with pytest.raises(FormatError, match="manifest.json was changed after save.*verify=False"):
        load(ck, Net)


def test_a_manifest_without_a_digest_still_loads(ck):
    _edit(ck, lambda m: m.pop("manifest_sha256"))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(load(ck, Net)(x), Net()(x))


@pytest.mark.parametrize("out, text", [(-3, "out_channels = -3 is negative"),
                                       (10**12, "would allocate .* bytes, more than the whole weights file")])
def test_absurd_spec_sizes_are_refused_before_allocating(tmp_path, out, text):
    m = Net()
    bs.prune_(m, bs.ChannelPruning(ratio=0.5), example_inputs=torch.randn(1, 3, 8, 8))
    ck = save(m, str(tmp_path / "ck"))
    _edit(ck, lambda man: man["modules"]["conv1"]["spec"].update(out_channels=out))
    with pytest.raises(FormatError, match=text):
        load(ck, Net, verify=False)


class SameConv(nn.Conv2d):
    """TF-style 'same' padding computed in forward (lukemelas EfficientNet's Conv2dStaticSamePadding idea)."""

    def forward(self, x):
        kh, kw = self.kernel_size
        x = F.pad(x, (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.fc = SameConv(3, 16, 3), SameConv(16, 16, 3), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_a_pruned_conv2d_subclass_saves_and_loads_keeping_its_class(tmp_path):
    m = SameNet().eval()
    bs.prune_(m, bs.ChannelPruning(ratio=0.5), example_inputs=torch.randn(1, 3, 8, 8))
    assert m.a.out_channels < 16
    ck = save(m, str(tmp_path / "ck"))
    again = load(ck, SameNet).eval()
    assert type(again.a) is SameConv and again.a.weight.shape == m.a.weight.shape
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))


class ExtraConv(nn.Conv2d):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.scale = nn.Parameter(torch.ones(1))


def test_save_refuses_a_module_it_could_not_rebuild_before_writing(tmp_path):
    m = nn.Sequential(SameConv(3, 8, 3), ExtraConv(8, 8, 3))
    with torch.no_grad():  # a hand-made surgery that forgot the attribute: out_channels still says 8
        m[0].weight = nn.Parameter(m[0].weight[:4].clone())
        m[0].bias = nn.Parameter(m[0].bias[:4].clone())
    with pytest.raises(FormatError, match=r"module '0' \(SameConv, a subclass of torch.Conv2d\) holds tensors "
                                          r"\['bias', 'weight'\].*load\(\) could not rebuild it"):
        save(m, str(tmp_path / "ck"))
    assert os.listdir(tmp_path) == []
    m[0].out_channels = 4
    m[1] = ExtraConv(4, 8, 3)
    ck = save(m, str(tmp_path / "ck"))  # consistent now; the subclass's own extra tensor is fine
    assert type(load(ck, lambda: nn.Sequential(SameConv(3, 8, 3), ExtraConv(8, 8, 3)))[1]) is ExtraConv
