"""calib.driver: when each layer is solved and which inputs built its Hessian."""

import copy

import pytest
import torch
from torch import nn

from brainsurgeon.calib import capture_hessians, execution_order, run_layerwise
from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import CalibrationError, ConfigError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.drop = nn.Dropout(0.5)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x))))))


class Block(nn.Module):
    """Transformer-like block: attention (q/k/v read the same tensor) + MLP; returns a tuple."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h, mask=None):
        x = self.norm(h)
        att = self.q(x) @ self.k(x).transpose(-1, -2) / 8 ** 0.5
        if mask is not None:
            att = att.masked_fill(~mask[:, None, :], float("-inf"))
        h = h + self.o(att.softmax(-1) @ self.v(x))
        return (h + self.fc2(torch.relu(self.fc1(h)))), None


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x, mask=None):
        h = self.embed(x)
        for blk in self.layers:
            h = blk(h, mask=mask)[0]
        return self.head(h)


def lm_calib(n: int = 3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 4:] = False
        out.append({"x": torch.randn(2, 6, 5, generator=g), "mask": mask})
    return out


def mlp_calib(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g), torch.zeros(4)) for _ in range(n)]


def recorder(halve: bool = False):
    """A layer 'solver' that records each H by layer name; `halve` also halves the weight, a "compression"
    later layers must see."""
    seen: dict[str, torch.Tensor] = {}

    def solve(name, module, H):
        seen[name] = H.clone()
        if halve:
            module.weight.data.mul_(0.5)

    return seen, solve


LM_NAMES = [f"layers.{i}.{n}" for i in range(3) for n in ("q", "k", "v", "o", "fc1", "fc2")]


def test_dense_mode_uses_dense_hessians_sequential_sees_compressed_layers():
    torch.manual_seed(0)
    model, calib = MLP(), mlp_calib()
    m = copy.deepcopy(model).eval()
    with capture_hessians(m, ["fc2"]) as dense_h, torch.no_grad():
        for x, _ in calib:
            m(x)
    H_dense = dense_h["fc2"].H
    for mode, same in (("dense", True), ("sequential", False)):
        m = copy.deepcopy(model)
        seen: dict[str, torch.Tensor] = {}

        def solve(name, module, H, seen=seen):
            seen[name] = H.clone()
            if name == "fc1":
                module.weight.data.zero_()

        run_layerwise(m, ["fc1", "fc2"], calib, solve, CalibOptions(mode=mode))
        assert list(seen) == ["fc1", "fc2"]
        assert seen["fc2"].dtype == torch.float32  # the default accumulation precision
        assert torch.allclose(seen["fc2"].double(), H_dense, atol=1e-5) is same, mode


def test_hooks_removed_and_modes_restored_also_when_solve_raises():
    model = MLP().train()
    model.fc2.eval()  # a mixed state must come back exactly

    def solve(name, module, H):
        raise RuntimeError("boom")

    for opts in (CalibOptions(mode="dense"), CalibOptions(), CalibOptions(blocks="layers")):
        target = TinyLM().train() if opts.blocks else model
        names = LM_NAMES if opts.blocks else ["fc1", "fc2"]
        calib = lm_calib() if opts.blocks else mlp_calib()
        with pytest.raises(RuntimeError, match="boom"):
            run_layerwise(target, names, calib, solve, opts)
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in target.modules())
        assert target.training
    assert model.fc1.training and not model.fc2.training


def test_model_is_in_eval_mode_during_calibration():
    model = MLP().train()
    states = []
    run_layerwise(model, ["fc1"], mlp_calib(), lambda n, m, H: states.append(m.training), CalibOptions())
    assert states == [False] and model.training


@pytest.mark.parametrize("mode", ["dense", "sequential"])
def test_unreached_layer_raises_with_name_and_ignore(mode):
    with pytest.raises(CalibrationError, match=r"\['unused'\] were never reached.*ignore"):
        run_layerwise(MLP(), ["fc1", "unused"], mlp_calib(), lambda *a: None, CalibOptions(mode=mode))


def test_empty_calibration_raises():
    with pytest.raises(CalibrationError, match="calibration data is empty"):
        run_layerwise(MLP(), ["fc1"], [], lambda *a: None, CalibOptions())


def test_max_batches_limits_columns():
    ns = []
    run_layerwise(MLP(), ["fc1"], mlp_calib(5), lambda n, m, H: ns.append(H), CalibOptions(max_batches=2))
    X = torch.cat([x for x, _ in mlp_calib(2)]).double()
    torch.testing.assert_close(ns[0].double(), 2 * X.T @ X / 8, atol=1e-5, rtol=1e-6)


def test_qkv_share_one_hessian_group():
    model = TinyLM().eval()
    layers = {n: model.get_submodule(n) for n in LM_NAMES[:6]}
    with torch.no_grad():
        groups, repeated = execution_order(model, layers, lambda: [((), lm_calib()[0])])
    assert groups == [["layers.0.q", "layers.0.k", "layers.0.v"], ["layers.0.o"], ["layers.0.fc1"],
                      ["layers.0.fc2"]]
    assert repeated == set()


def test_one_shot_generator_works_in_sequential_mode():
    seen, solve = recorder()
    run_layerwise(MLP(), ["fc1", "fc2"], iter(mlp_calib()), solve, CalibOptions())
    assert set(seen) == {"fc1", "fc2"}


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def test_layer_called_twice_sees_every_call_in_sequential_mode():
    model, calib = Twice(), [torch.randn(3, 4) for _ in range(2)]
    seen_d, solve_d = recorder()
    seen_s, solve_s = recorder()
    run_layerwise(model, ["fc"], calib, solve_d, CalibOptions(mode="dense"))
    run_layerwise(model, ["fc"], calib, solve_s, CalibOptions(mode="sequential"))
    torch.testing.assert_close(seen_d["fc"], seen_s["fc"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("offload", [False, True])
def test_block_mode_equals_per_layer_sequential(offload):
    torch.manual_seed(0)
    model, calib = TinyLM(), lm_calib()
    per_layer, solve_p = recorder()
    blocked, solve_b = recorder()
    run_layerwise(model, LM_NAMES, calib, solve_p, CalibOptions(mode="sequential"))
    run_layerwise(model, LM_NAMES, calib, solve_b, CalibOptions(blocks="layers", offload=offload))
    assert list(blocked) == LM_NAMES
    for name in LM_NAMES:
        torch.testing.assert_close(blocked[name], per_layer[name], atol=1e-8, rtol=0)


def test_block_mode_sequential_sees_compressed_block_dense_does_not():
    """dense: every H from the dense model; sequential: earlier blocks compressed, one forward per block
    (so o sees the dense q/k/v of its own block); true_sequential: earlier groups of the block too."""
    torch.manual_seed(0)
    model, calib = TinyLM(), lm_calib()
    ref, solve_ref = recorder()
    run_layerwise(copy.deepcopy(model), LM_NAMES, calib, solve_ref, CalibOptions(mode="dense"))
    cases = [(CalibOptions(mode="dense", blocks="layers"), {"layers.0.o": True, "layers.1.q": True}),
             (CalibOptions(blocks="layers"), {"layers.0.o": True, "layers.0.fc2": True, "layers.1.q": False}),
             (CalibOptions(blocks="layers", true_sequential=True), {"layers.0.o": False, "layers.1.q": False})]
    for opts, same in cases:
        seen, solve = recorder(halve=True)
        run_layerwise(copy.deepcopy(model), LM_NAMES, calib, solve, opts)
        assert torch.allclose(seen["layers.0.q"], ref["layers.0.q"], atol=1e-6)  # first layer: always
        for name, want in same.items():
            assert torch.allclose(seen[name], ref[name], atol=1e-6) is want, (opts, name)


def test_block_mode_runs_two_block_forwards_per_batch_true_sequential_one_per_group():
    model, calib = TinyLM(), lm_calib()
    for opts, per_block in ((CalibOptions(blocks="layers"), 2), (CalibOptions(mode="dense", blocks="layers"), 1),
                            (CalibOptions(blocks="layers", true_sequential=True), 4 + 1)):
        calls = [0]
        h = model.layers[1].register_forward_pre_hook(lambda m, a, calls=calls: calls.__setitem__(0, calls[0] + 1))
        try:
            run_layerwise(model, LM_NAMES, calib, lambda *a: None, opts)
        finally:
            h.remove()
        # a middle block: capture (or one forward per group q/k/v, o, fc1, fc2 and one order probe) + propagate
        assert calls[0] == per_block * len(calib) + (1 if opts.true_sequential else 0), opts


def test_block_mode_rejects_layers_outside_the_blocks():
    with pytest.raises(ConfigError, match=r"\['head'\] are outside the blocks 'layers'.*ignore"):
        run_layerwise(TinyLM(), ["layers.0.q", "head"], lm_calib(), lambda *a: None,
                      CalibOptions(blocks="layers"))
    with pytest.raises(ConfigError, match="not a non-empty nn.ModuleList"):
        run_layerwise(TinyLM(), ["layers.0.q"], lm_calib(), lambda *a: None, CalibOptions(blocks="head"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_offload_keeps_model_on_cpu_and_computes_on_cuda():
    torch.manual_seed(0)
    model, calib = TinyLM(), lm_calib()
    ref, solve_ref = recorder()
    run_layerwise(model, LM_NAMES, calib, solve_ref, CalibOptions(blocks="layers"))
    devices = []
    seen, solve = recorder()

    def solve_cuda(name, module, H):
        devices.append((module.weight.device.type, H.device.type))
        solve(name, module, H)

    cuda_calib = [{k: v.cuda() for k, v in b.items()} for b in calib]
    run_layerwise(model, LM_NAMES, cuda_calib, solve_cuda, CalibOptions(blocks="layers", offload=True))
    assert set(devices) == {("cuda", "cuda")}
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name in LM_NAMES:
        torch.testing.assert_close(seen[name].cpu(), ref[name], atol=1e-6, rtol=1e-5)


class KwargBlock(Block):
    """A block called as block(hidden_states=h, mask=m) that returns a plain tensor."""

    def forward(self, hidden_states, mask=None):
        return super().forward(hidden_states, mask)[0]


class KwargLM(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(KwargBlock() for _ in range(3))

    def forward(self, x, mask=None):
        h = self.embed(x)
        for blk in self.layers:
            h = blk(hidden_states=h, mask=mask)
        return self.head(h)


def test_block_mode_with_keyword_hidden_states_and_tensor_outputs():
    torch.manual_seed(0)
    model, calib = KwargLM(), lm_calib()
    per_layer, solve_p = recorder()
    blocked, solve_b = recorder()
    run_layerwise(model, LM_NAMES, calib, solve_p, CalibOptions())
    run_layerwise(model, LM_NAMES, calib, solve_b, CalibOptions(blocks="layers"))
    for name in LM_NAMES:
        torch.testing.assert_close(blocked[name], per_layer[name], atol=1e-8, rtol=0)


def test_layers_reading_one_tensor_share_one_hessian_and_in_place_damping_does_not_leak():
    torch.manual_seed(0)
    model, calib = TinyLM(), lm_calib()
    with capture_hessians(model, LM_NAMES) as hs, torch.no_grad():  # one accumulator per layer
        for b in calib:
            model(**b)
    opts = CalibOptions(mode="dense", blocks="layers", hessian_dtype="float64")
    ids: dict[str, int] = {}
    run_layerwise(model, LM_NAMES, calib, lambda name, module, H: ids.__setitem__(name, id(H)), opts)
    assert ids["layers.0.q"] == ids["layers.0.k"] == ids["layers.0.v"] != ids["layers.0.o"]
    assert ids["layers.0.fc1"] != ids["layers.0.o"]

    def solve(name, module, H):
        torch.testing.assert_close(H, hs[name].H, atol=1e-10, rtol=0)  # the original, whoever damped before
        H.diagonal().add_(1.0)  # a solver that damps in place

    run_layerwise(model, LM_NAMES, calib, solve, opts)


class Res(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class DeepNet(nn.Module):
    """A stem outside any chain, a deep nn.Sequential of residual blocks (nested chain inside), a head."""

    def __init__(self, depth: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.features = nn.Sequential(*(Res() for _ in range(depth)), nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU()))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.features(torch.relu(self.stem(x))).mean((2, 3)))


def test_sequential_replay_sees_the_same_hessians_as_stopped_forwards_in_linear_time():
    from brainsurgeon.calib import passes

    torch.manual_seed(0)
    model = DeepNet()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    (replay, solve_replay), (stopped, solve_stopped) = recorder(halve=True), recorder(halve=True)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    calls = [0]
    m1.stem.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    run_layerwise(m1, names, calib, solve_replay, CalibOptions())
    with torch.no_grad():
        layers = dict(m2.named_modules())
        passes._solve_sequential(m2, {n: layers[n] for n in names}, lambda: [((x,), {}) for x in calib],
                                 solve_stopped, torch.float32)
    assert list(replay) == names
    for n in names:
        torch.testing.assert_close(replay[n], stopped[n], atol=1e-5, rtol=1e-5)
    # model-input forwards: order probes, stem, one catch of the chain's inputs, head; not one per layer
    assert calls[0] <= 6 * len(calib) < len(names) * len(calib)


def _widening():
    """A chain whose third child widens 6 -> 24 channels: its mapped cache is 4x the chain's input cache."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 24, 1), nn.ReLU(), nn.Conv2d(24, 6, 1))
    return nn.Sequential(chain, nn.Flatten(), nn.Linear(6 * 64, 4))


# DeepNet, 0 MB: nothing replayed. _widening, 0.01 MB: the chain's inputs (2 x 1.5 KB) and the first maps
# (2 x 3 KB) fit, the 24-channel map (12 KB per batch) does not: its later layers fall back midway.
@pytest.mark.parametrize("build,bound_mb,path", [(DeepNet, 0.0, "features"), (_widening, 0.01, "0")])
def test_replay_over_its_memory_bound_falls_back_to_input_forwards_with_the_same_hessians(build, bound_mb, path):
    model = build()
    torch.manual_seed(1)
    calib = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    (replay, solve_replay), (bounded, solve_bounded) = recorder(halve=True), recorder(halve=True)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    assert run_layerwise(m1, names, calib, solve_replay, CalibOptions()) == []
    calls = [0]
    first = next(m for m in m2.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    notes = run_layerwise(m2, names, calib, solve_bounded, CalibOptions(replay_cache_mb=bound_mb))
    assert len(notes) == 1 and f"replay of {path}:" in notes[0] and "replay_cache_mb" in notes[0], notes
    assert list(bounded) == names
    for n in names:
        torch.testing.assert_close(bounded[n], replay[n], atol=1e-5, rtol=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if build is _widening:
        assert "1 of its 3 layer(s)" in notes[0]  # conv 24 -> 6, after the widening conv
        assert calls[0] >= 2 * len(calib)  # the fallback's forwards from the model input reach the first conv


def test_calib_options_blocks_is_a_dotted_path_and_a_verb_refuses_one_naming_no_block_list():
    import brainsurgeon as bs

    for bad in (".layers", "model..layers", "model.layers.", "model layers", "model/layers"):
        with pytest.raises(ConfigError, match=r"CalibOptions: blocks must be '' .*dotted path.*'model.layers'"):
            CalibOptions(blocks=bad)
    model, calib = TinyLM(), lm_calib()
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    for path in ("x", "head"):
        with pytest.raises(ConfigError, match=r"CalibOptions.blocks: .*not a non-empty nn.ModuleList.*'layers'"):
            bs.quantize_(model, bs.GPTQ(bits=4), calib, options=CalibOptions(blocks=path))
    assert calls[0] == 0  # refused before any calibration forward
