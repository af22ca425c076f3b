"""Damaged, pickled or mismatched inputs give FormatError with the fix; a failed save leaves nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.utils.prune
from export_fixtures import digits, narrowed_digits
from torch import nn

from brainsurgeon.errors import FormatError
from brainsurgeon.export import checkpoint, load, save
from brainsurgeon.models import build_model


def fresh() -> nn.Module:
    return build_model("digits-cnn")


@pytest.fixture
def ck(tmp_path) -> str:
    path = str(tmp_path / "ck")
    save(narrowed_digits(), path)
    return path


def _weights(ck: str) -> str:
    return os.path.join(ck, "model.safetensors")


def test_truncated_weights(ck):
    w = _weights(ck)
    data = open(w, "rb").read()
    open(w, "wb").write(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"model\.safetensors is \d+ bytes .* truncated.*save again"):
        load(ck, fresh)


def test_corrupted_weights_fail_the_checksum(ck):
    w = _weights(ck)
    data = bytearray(open(w, "rb").read())
    data[-100] ^= 0xFF  # one flipped byte inside a tensor: size unchanged, values wrong
    open(w, "wb").write(bytes(data))
    with pytest.raises(FormatError, match=r"does not match the SHA-256 .* corrupted.*save the model again"):
        load(ck, fresh)


def test_corrupted_header_without_checksum(ck):
    w = _weights(ck)
    data = bytearray(open(w, "rb").read())
    data[8:40] = b"\x00" * 32  # garbage in the safetensors JSON header
    open(w, "wb").write(bytes(data))
    with pytest.raises(FormatError, match=r"model\.safetensors is not a readable safetensors file.*corrupted"):
        load(ck, fresh, verify=False)


def test_corrupted_manifest(ck):
    p = os.path.join(ck, "manifest.json")
    open(p, "w").write(open(p).read()[:50])
    with pytest.raises(FormatError, match=r"manifest\.json is not valid JSON.*Save the model again"):
        load(ck, fresh)


def test_future_format_version(ck):
    p = os.path.join(ck, "manifest.json")
    man = json.load(open(p))
    man["brainsurgeon_checkpoint"] = 99
    json.dump(man, open(p, "w"))
    with pytest.raises(FormatError, match="version 99 is not supported"):
        load(ck, fresh)


def test_unknown_module_format_lists_registered(ck):
    p = os.path.join(ck, "manifest.json")
    man = json.load(open(p))
    man["modules"]["fc1"] = {"format": "int3_magic", "spec": {}}
    json.dump(man, open(p, "w"))
    with pytest.raises(FormatError, match=r"manifest\.json was changed after save"):
        load(ck, fresh)  # verify=True: the manifest's own digest catches the edit first
    with pytest.raises(FormatError, match=r"unknown module format 'int3_magic'; registered: .*register_module_format"):
        load(ck, fresh, verify=False)


def test_mismatched_model_names_the_tensor_and_fix(ck):
    class Other(type(fresh())):  # the same layers plus one more
        def __init__(self) -> None:
            super().__init__()
            self.fc9 = nn.Linear(3, 3)

    with pytest.raises(FormatError, match=r"does not match Other: missing tensors \['fc9\.weight'.*Pass the model_fn"):
        load(ck, Other)
    with pytest.raises(FormatError, match=r"module 'conv1' but the model built by model_fn \(Linear\)"):
        load(ck, lambda: nn.Linear(2, 2))
    with pytest.raises(FormatError, match="model_fn must be a callable"):
        load(ck, 42)


def test_custom_tensor_takes_its_saved_shape_and_a_mismatch_is_named(tmp_path):
    class Net(nn.Module):
        def __init__(self, n: int = 4) -> None:
            super().__init__()
            self.register_buffer("table", torch.arange(float(n)))  # a custom buffer: no module spec covers it

    save(Net(6), str(tmp_path / "ck"))
    assert torch.equal(load(str(tmp_path / "ck"), Net).table, torch.arange(6.0))  # resized from manifest "shapes"
    path = tmp_path / "ck" / "manifest.json"
    m = json.loads(path.read_text())
    del m["shapes"]  # a manifest from before shapes were recorded
    path.write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"shape mismatches \['table: saved \(6,\) vs model \(4,\)'\]"):
        load(str(tmp_path / "ck"), Net, verify=False)


def test_pickles_are_refused_by_default(tmp_path):
    model = digits()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(FormatError, match=r"model\.pt is a pickle .* refuses it.*allow_pickle=True"):
        load(str(tmp_path / "model.pt"), fresh)
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    torch.save(model.state_dict(), hf_like / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"pytorch_model\.bin is a pickle"):
        load(str(hf_like), fresh)
    again = load(str(tmp_path / "model.pt"), fresh, allow_pickle=True).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FormatError, match="not found; pass the folder written by save"):
        load(str(tmp_path / "nope"), fresh)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"manifest\.json not found.*brainsurgeon\.export\.save"):
        load(str(tmp_path / "empty"), fresh)


def _leftovers(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith((".tmp-", ".old-")))


def test_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    def boom(tmp: str, manifest: dict) -> None:
        assert os.path.isfile(os.path.join(tmp, "model.safetensors"))  # weights were already written
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        save(digits(), str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists() and _leftovers(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint(ck, tmp_path):
    before = open(_weights(ck), "rb").read()
    with pytest.raises(FormatError, match="plan: value .* cannot be stored as JSON"):
        save(digits(), ck, plan={"fc1": object()})
    assert open(_weights(ck), "rb").read() == before and _leftovers(tmp_path) == []
    save(digits(), ck)  # a successful save replaces it whole
    assert load(ck, fresh).conv2.out_channels == 32 and _leftovers(tmp_path) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FormatError, match="not a brainsurgeon checkpoint; refusing to replace it"):
        save(digits(), str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_pruning_masks_must_be_made_permanent(tmp_path):
    model = digits()
    torch.nn.utils.prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    with pytest.raises(FormatError, match=r"'fc1' carries a parametrization or a torch\.nn\.utils\.prune mask.*remove"):
        save(model, str(tmp_path / "ck"))
    torch.nn.utils.prune.remove(model.fc1, "weight")
    save(model, str(tmp_path / "ck"))
    assert float((load(str(tmp_path / "ck"), fresh).fc1.weight == 0).float().mean()) == pytest.approx(0.5)


def test_parametrized_modules_are_refused(tmp_path):
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).t()

    model = nn.Sequential(nn.Linear(4, 4))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    with pytest.raises(FormatError, match=r"module '0' carries a parametrization"):
        save(model, str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()


def test_weight_norm_is_saved_as_its_g_and_v_and_resized_on_load(tmp_path):
    """torch's weight norm (wav2vec2's pos conv) is data: its g/v tensors are saved, the narrower module
    model_fn builds takes the saved shapes, outputs are identical; any other parametrization is refused."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Net(nn.Module):
        def __init__(self, c: int = 4) -> None:
            super().__init__()
            self.conv = weight_norm(nn.Conv1d(c, c, 3, padding=1, groups=2), dim=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    torch.manual_seed(0)
    model, x = Net(6), torch.rand(1, 6, 5)
    save(model, str(tmp_path / "ck"))
    again = load(str(tmp_path / "ck"), Net)
    assert parametrize.is_parametrized(again.conv) and again.conv.in_channels == 6
    assert torch.equal(again(x), model(x))
    parametrize.register_parametrization(model.conv, "bias", nn.Identity())
    with pytest.raises(FormatError, match=r"module 'conv' carries a parametrization"):
        save(model, str(tmp_path / "ck2"))
    assert not (tmp_path / "ck2").exists()


def test_meta_tensors_are_refused(tmp_path):
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(FormatError, match=r"tensor 'weight' is on the meta device .* materialize"):
        save(model, str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()
