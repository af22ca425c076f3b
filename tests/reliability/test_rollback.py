"""Bug 13.#1: a failed compress() restores the model in place, keeping every object the caller holds."""

import pytest
import torch
from reliability_state import assert_untouched, capture
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError


class Net(nn.Module):
    """conv1 has 3 input channels: a 2:4 pattern cannot split its 3*3*3 = 27 columns into fours."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


STRICT = bs.CalibOptions(strict=True)  # refuse conv1 instead of keeping it dense, so the recipe fails
RECIPE = bs.Recipe((bs.config.Step(bs.ChannelPruning(ratio=0.5)), bs.config.Step(bs.ExactOBS(pattern="2:4"))), STRICT)


def test_failed_compress_keeps_parameter_and_module_objects():
    m = Net().eval()
    w, conv1, bn1 = m.conv1.weight, m.conv1, m.bn1
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(calib()[0]).sum().backward()  # grads set: they must survive too
    m.conv2.register_forward_hook(lambda *a: None)
    before = capture(m)
    with pytest.raises(BrainsurgeonError, match="conv1"):
        bs.compress(m, RECIPE, calib())
    assert m.conv1 is conv1 and m.bn1 is bn1 and m.conv1.weight is w
    assert_untouched(m, before)
    w0 = w.detach().clone()
    opt.step()  # the optimizer built before the call still updates the model
    assert not torch.equal(m.conv1.weight, w0)


def test_failed_weight_only_recipe_keeps_objects():
    m = Net().eval()
    before = capture(m)
    recipe = bs.Recipe((bs.config.Step(bs.RTN(bits=4)), bs.config.Step(bs.ExactOBS(pattern="2:4"))), STRICT)
    with pytest.raises(BrainsurgeonError, match="conv1"):
        bs.compress(m, recipe, calib())
    assert_untouched(m, before)


def test_failed_compress_restores_an_hf_config_edited_by_a_pruning_step(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from brainsurgeon import api
    from brainsurgeon.errors import NumericalError

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    llm = transformers.LlamaForCausalLM(cfg).eval()
    config = llm.config
    before = capture(llm)
    seen = []

    def fail(W, H, cfg, name=""):
        seen.append(llm.config.intermediate_size)
        raise NumericalError(f"layer {name}: injected failure after the pruning step")

    monkeypatch.setattr(api, "compress_weight", fail)
    recipe = bs.Recipe((bs.config.Step(bs.ChannelPruning(ratio=0.5, ignore=("lm_head",))),
                        bs.config.Step(bs.RTN(bits=4), ("model.embed_tokens",))))
    with pytest.raises(NumericalError, match="injected"):
        bs.compress(llm, recipe, [torch.randint(0, 64, (2, 8)) for _ in range(2)])
    assert seen and seen[0] < 48  # the pruning step had narrowed the config before the failure
    assert llm.config is config and llm.config.intermediate_size == 48
    assert_untouched(llm, before)


def test_failed_apply_plan_undoes_the_channel_surgery_in_place(monkeypatch):
    from brainsurgeon import api
    from brainsurgeon.errors import NumericalError
    from brainsurgeon.search import Plan, apply_plan_

    m = Net().eval()
    conv1, w = m.conv1, m.conv1.weight
    before = capture(m)
    plan = Plan((("conv1", (bs.ChannelPruning(ratio=0.5),)), ("conv2", (bs.RTN(bits=4),)), ("fc", (bs.RTN(bits=4),))))
    widths = []

    def fail(W, H, cfg, name=""):
        widths.append(m.conv1.out_channels)
        raise NumericalError("injected failure after the channel surgery")

    monkeypatch.setattr(api, "compress_weight", fail)
    with pytest.raises(NumericalError, match="injected"):
        apply_plan_(m, plan, calib())
    assert widths and widths[0] < 8  # the surgery had happened before the failure
    assert m.conv1 is conv1 and m.conv1.weight is w and m.conv1.out_channels == 8
    assert_untouched(m, before)
