"""Torch-free checkpoint reading checked against torch.save / torch.load, and strict matching."""

from __future__ import annotations

import argparse
import pathlib
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from lsfa_jax.models.checkpoint_io import (
    CheckpointError,
    flatten_state_dict,
    load_orbax,
    load_state_dict,
    save_orbax,
    strict_match,
)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def test_dtypes_and_values_match_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(5, dtype=torch.float64, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(-3, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(4, generator=g)),
    }
    torch.save(sd, tmp_path / "d.pth")
    got = load_state_dict(tmp_path / "d.pth")
    assert set(got) == set(sd)
    for k, t in sd.items():
        want = as_numpy(t.detach())
        assert got[k].shape == want.shape, k
        assert got[k].dtype.itemsize == t.element_size(), k
        np.testing.assert_array_equal(np.asarray(got[k], dtype=want.dtype), want, err_msg=k)


def test_views_sharing_one_storage(tmp_path):
    base = torch.arange(24.0)
    sd = {
        "slice": base[5:11],
        "transposed": base.view(4, 6).t(),
        "strided": base.view(4, 6)[1:, ::2],
        "expanded": base[:3].view(3, 1).expand(3, 4),
    }
    torch.save(sd, tmp_path / "v.pth")
    got = load_state_dict(tmp_path / "v.pth")
    for k, t in sd.items():
        np.testing.assert_array_equal(got[k], t.numpy(), err_msg=k)
        assert got[k].flags.c_contiguous and got[k].flags.writeable


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    data=st.data(),
)
def test_random_permuted_sliced_tensors(tmp_path_factory, shape, data):
    t = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    perm = data.draw(st.permutations(range(len(shape))))
    t = t.permute(*perm)
    start = data.draw(st.integers(0, t.shape[0] - 1))
    t = t[start:]
    path = tmp_path_factory.mktemp("h") / "t.pth"
    torch.save({"t": t}, path)
    np.testing.assert_array_equal(load_state_dict(path)["t"], t.numpy())


def test_nested_point_mae_style_with_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    ckpt = {
        "base_model": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "epoch": 300,
        "metrics": {"acc": 0.5},
        "best_metrics": {},
    }
    torch.save(ckpt, tmp_path / "pretrain.pth")
    got = load_state_dict(tmp_path / "pretrain.pth")
    assert got["epoch"] == 300 and got["metrics"] == {"acc": 0.5} and got["best_metrics"] == {}
    for k, v in ckpt["base_model"].items():
        np.testing.assert_array_equal(got["base_model"][k], v.numpy())
    want_opt = opt.state_dict()
    assert got["optimizer"]["param_groups"][0]["lr"] == want_opt["param_groups"][0]["lr"]
    assert got["optimizer"]["param_groups"][0]["betas"] == want_opt["param_groups"][0]["betas"]
    np.testing.assert_array_equal(
        got["optimizer"]["state"][0]["exp_avg"], want_opt["state"][0]["exp_avg"].numpy()
    )
    flat = flatten_state_dict(got)
    assert "base_model.module.1.running_var" in flat
    assert "optimizer.state.2.exp_avg_sq" in flat
    assert "epoch" not in flat and not any(k.startswith("metrics") for k in flat)
    assert all(isinstance(v, np.ndarray) for v in flat.values())


def test_arbitrary_objects_are_refused(tmp_path):
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, tmp_path / "ns.pth")
    with pytest.raises(CheckpointError, match=r"ns\.pth.*argparse\.Namespace"):
        load_state_dict(tmp_path / "ns.pth")
    torch.save({"w": np.ones(2)}, tmp_path / "np.pth")
    with pytest.raises(CheckpointError, match=r"np\.pth.*refusing to unpickle numpy"):
        load_state_dict(tmp_path / "np.pth")


class _Touch:
    """Pickles to a call of pathlib.Path.touch: loading it must not create the file."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_code_in_pickle_is_never_run(tmp_path):
    target = tmp_path / "pwned"
    torch.save({"x": _Touch(target)}, tmp_path / "evil.pth")
    with pytest.raises(
        CheckpointError, match=r"evil\.pth: refusing to unpickle __builtin__.getattr"
    ):
        load_state_dict(tmp_path / "evil.pth")
    assert not target.exists()


def test_truncated_corrupt_legacy_and_missing_files(tmp_path):
    torch.save({"w": torch.randn(1000)}, tmp_path / "ok.pth")
    raw = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a PyTorch zip checkpoint"):
        load_state_dict(tmp_path / "cut.pth")

    with zipfile.ZipFile(tmp_path / "ok.pth") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    broken = bytearray(raw)
    data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    broken[data_start + 100] ^= 0xFF
    (tmp_path / "flip.pth").write_bytes(bytes(broken))
    with pytest.raises(CheckpointError, match=r"flip\.pth.*corrupt"):
        load_state_dict(tmp_path / "flip.pth")

    with (
        zipfile.ZipFile(tmp_path / "ok.pth") as src,
        zipfile.ZipFile(tmp_path / "short.pth", "w") as dst,
    ):
        for item in src.infolist():
            payload = src.read(item)
            dst.writestr(item, payload[:40] if item.filename.endswith("data/0") else payload)
    with pytest.raises(CheckpointError, match=r"short\.pth: storage .*data/0 has 40 bytes"):
        load_state_dict(tmp_path / "short.pth")

    torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"old\.pth: legacy.*re-save"):
        load_state_dict(tmp_path / "old.pth")

    with pytest.raises(CheckpointError, match=r"absent\.pth: no such checkpoint file"):
        load_state_dict(tmp_path / "absent.pth")
    (tmp_path / "w.ckpt.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint extension"):
        load_state_dict(tmp_path / "w.ckpt.txt")


def test_safetensors_and_npz(tmp_path):
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int64)}
    save_file(arrays, str(tmp_path / "m.safetensors"))
    np.savez(tmp_path / "m.npz", **arrays)
    for name in ("m.safetensors", "m.npz"):
        got = load_state_dict(tmp_path / name)
        assert set(got) == set(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype
    np.savez(tmp_path / "obj.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"obj\.npz"):
        load_state_dict(tmp_path / "obj.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_strict_match_reports_all_problems_in_one_error():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    state = {
        "a": np.zeros((3, 2)),
        "b": np.zeros(4),
        "x": np.zeros(1),
        "decoder.w": np.zeros(1),
    }
    with pytest.raises(CheckpointError) as err:
        strict_match(state, expected, ignore_prefixes=("decoder.",), source="f.pth")
    msg = str(err.value)
    assert msg.splitlines() == [
        "f.pth: checkpoint does not match the model",
        "  missing keys (1): c",
        "  unexpected keys (1): x",
        "  shape mismatches (1): a: checkpoint (3, 2) vs model (2, 3)",
    ]
    strict_match({"a": np.zeros((2, 3))}, {"a": (2, 3)}, source="ok")


def test_orbax_round_trip_and_overwrite(tmp_path):
    tree = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2)}
    save_orbax(tree, tmp_path / "ck")
    got = load_orbax(tmp_path / "ck")
    np.testing.assert_array_equal(got["layer"]["kernel"], tree["layer"]["kernel"])
    np.testing.assert_array_equal(got["b"], tree["b"])
    with pytest.raises(CheckpointError, match="already exists"):
        save_orbax(tree, tmp_path / "ck")
    save_orbax({"b": np.zeros(3)}, tmp_path / "ck", overwrite=True)
    got = load_orbax(tmp_path / "ck")
    assert set(got) == {"b"}
    np.testing.assert_array_equal(got["b"], np.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging folders left
    with pytest.raises(CheckpointError, match="no such orbax"):
        load_orbax(tmp_path / "nope")
