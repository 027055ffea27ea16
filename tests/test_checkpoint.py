"""Checkpoints: a plain dict that loads with weights_only=True, clear errors, and an exact --resume."""
import dataclasses
import os
import shutil

import pytest
import torch

import train
from config import DiffusionConfig, ModelConfig, TrainConfig, preset_config
from checkpoint import (CheckpointError, load_checkpoint, load_model, load_state_strict, save_checkpoint,
                        state_fingerprint)
from unet import UNet


def run_train(out_dir, *extra):
    return train.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--out-dir", str(out_dir),
                       *extra])


def probe_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn((3, 1, 28, 28), generator=g), torch.tensor([0, 25, 49]), torch.tensor([1, 5, 10])


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert type(ckpt) is dict
    assert {"model", "ema", "optimizer", "step", "epoch", "config", "version"} <= set(ckpt)
    assert ckpt["version"] == 1 and ckpt["kind"] == "base"
    assert ckpt["step"] == preset_config(TrainConfig, "tiny").max_steps == 4
    assert ckpt["config"]["model"] == dataclasses.asdict(preset_config(ModelConfig, "tiny"))
    assert ckpt["config"]["diffusion"] == dataclasses.asdict(preset_config(DiffusionConfig, "tiny"))
    assert ckpt["config"]["train"]["max_steps"] == 4 and ckpt["config"]["train"]["dataset"] == "mnist-5k"
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    assert set(ckpt["model"]) == set(ckpt["ema"]) == set(UNet(preset_config(ModelConfig, "tiny")).state_dict())
    # 4 AdamW steps with a (1+n)/(10+n) EMA warm-up: the EMA trails the raw weights
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    assert len(ckpt["optimizer"]["state"]) == len(list(UNet(preset_config(ModelConfig, "tiny")).parameters()))
    config_json = os.path.join(os.path.dirname(tiny_ckpt), "config.json")
    assert os.path.exists(config_json)
    assert os.path.exists(os.path.join(os.path.dirname(tiny_ckpt), "samples", "final.png"))


def test_load_model_rebuilds_the_ema_weights(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    reference = UNet(ModelConfig(**ckpt["config"]["model"])).eval()
    reference.load_state_dict(ckpt["ema"], strict=True)
    model, loaded = load_model(tiny_ckpt)
    assert not model.training
    assert loaded["step"] == ckpt["step"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k]), k
    x, t, labels = probe_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), reference(x, t, labels))
    raw, _ = load_model(tiny_ckpt, weights="model")
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in raw.state_dict().items())
    with pytest.raises(ValueError, match="ema or model"):
        load_model(tiny_ckpt, weights="best")


@pytest.mark.parametrize("where", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_map_location_round_trip(tiny_ckpt, tmp_path, where):
    model, ckpt = load_model(tiny_ckpt, map_location=where)
    assert all(p.device.type == "cpu" for p in model.parameters())
    path = tmp_path / "copy.pt"
    save_checkpoint(ckpt, str(path))
    again, _ = load_model(str(path), map_location=where)
    x, t, labels = probe_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), again(x, t, labels))


def test_truncated_checkpoint_raises(tiny_ckpt, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(open(tiny_ckpt, "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(str(bad))
    assert str(bad) in str(e.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(str(empty))


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "ckpt.pt"
    with pytest.raises(CheckpointError, match="not found") as e:
        load_model(str(missing))
    assert str(missing) in str(e.value) and "train.py" in str(e.value)


def test_pickled_module_is_refused(tmp_path):
    """torch.save(model) of a whole module (the tutorial's habit) does not load under weights_only=True."""
    path = tmp_path / "module.pt"
    torch.save(UNet(preset_config(ModelConfig, "tiny")), path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(str(path))


def test_wrong_kind_or_version_is_refused(tiny_ckpt, tmp_path):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    adapter_like = tmp_path / "adapter.pt"
    save_checkpoint({**ckpt, "kind": "lora"}, str(adapter_like))
    with pytest.raises(CheckpointError, match="not a base checkpoint"):
        load_model(str(adapter_like))
    future = tmp_path / "future.pt"
    save_checkpoint({**ckpt, "version": 99}, str(future))
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(str(future))


def test_state_dict_of_another_model_size_raises_shape_mismatch(tiny_ckpt, tmp_path):
    bigger = UNet(preset_config(ModelConfig, "tiny", channels=(16, 32)))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_state_strict(UNet(preset_config(ModelConfig, "tiny")), bigger.state_dict(), "test weights")
    # the same through a file whose saved config disagrees with its weights
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    path = tmp_path / "mixed.pt"
    save_checkpoint({**ckpt, "ema": bigger.state_dict()}, str(path))
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        load_model(str(path))
    assert "conv_in.weight" in str(e.value)


def test_missing_and_unexpected_keys_are_named():
    model = UNet(preset_config(ModelConfig, "tiny"))
    state = model.state_dict()
    state.pop("conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing \['conv_out.bias'\].*unexpected \['extra.weight'\]"):
        load_state_strict(model, state, "test weights")


def test_save_checkpoint_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    save_checkpoint({"a": torch.ones(2)}, str(path))
    save_checkpoint({"a": torch.zeros(2)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert os.listdir(tmp_path / "sub") == ["x.pt"]  # no temporary files left behind


def test_state_fingerprint_tracks_values():
    state = UNet(preset_config(ModelConfig, "tiny")).state_dict()
    fp = state_fingerprint(state)
    assert len(fp) == 16 and fp == state_fingerprint({k: v.clone() for k, v in state.items()})
    changed = {k: v.clone() for k, v in state.items()}
    changed["conv_out.bias"][0] += 1e-3
    assert state_fingerprint(changed) != fp


# ------------------------------------------------------------------ --resume

def test_resume_continues_bit_identically(tmp_path):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    run_train(straight, "--max-steps", "4")
    run_train(split, "--max-steps", "2")
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 2
    run_train(split, "--resume", "--max-steps", "4")
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    # same data order, noise, learning rates and optimizer state: the same arithmetic, bit for bit
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(b[part][k], a[part][k]), f"{part} {k}"
    for i, state in a["optimizer"]["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(b["optimizer"]["state"][i][name], state[name]), f"optimizer {i} {name}"
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"])


def test_resume_from_an_explicit_path(tmp_path, tiny_ckpt):
    out = tmp_path / "elsewhere"
    run_train(out, "--resume", tiny_ckpt, "--max-steps", "5")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5
    assert torch.load(tiny_ckpt, weights_only=True)["step"] == 4  # the source is left alone


def test_resume_with_a_contradicting_model_flag_exits_2(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run_train(out, "--resume", "--channels", "4,8", "--max-steps", "6")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--channels (4, 8) contradicts" in err and "(8, 16)" in err
    assert (out / "ckpt.pt").read_bytes() == before
    with pytest.raises(SystemExit) as e:
        run_train(out, "--resume", "--timesteps", "60")
    assert e.value.code == 2 and "--timesteps 60 contradicts" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_schedule_setting_resumes_as_linear(tmp_path, tiny_ckpt, capsys):
    """A run saved before DiffusionConfig had ``schedule`` holds no such key: it was trained linear, resumes
    linear, and ``--schedule cosine`` on it is refused like any other contradicting flag."""
    out = tmp_path / "old"
    out.mkdir()
    ckpt = load_checkpoint(tiny_ckpt)
    del ckpt["config"]["diffusion"]["schedule"]
    save_checkpoint(ckpt, str(out / "ckpt.pt"))
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run_train(out, "--resume", "--schedule", "cosine", "--max-steps", "5")
    assert e.value.code == 2
    assert "--schedule cosine contradicts" in capsys.readouterr().err and (out / "ckpt.pt").read_bytes() == before
    run_train(out, "--resume", "--max-steps", "5")
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 5 and resumed["config"]["diffusion"]["schedule"] == "linear"


def test_a_checkpoint_from_before_the_position_code_is_rebuilt_without_it(tmp_path, tiny_ckpt, capsys):
    """A run saved before ModelConfig had ``pos_emb`` was trained without the position code: it samples and
    resumes without it (its outputs are those of a pos_emb=False model), and --pos-emb on it is refused."""
    out = tmp_path / "old"
    out.mkdir()
    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt["config"]["model"]["pos_emb"] is True  # the tiny preset, like the default, has it
    del ckpt["config"]["model"]["pos_emb"]
    save_checkpoint(ckpt, str(out / "ckpt.pt"))
    model, _ = load_model(str(out / "ckpt.pt"))
    assert model.cfg.pos_emb is False
    x, t, labels = probe_inputs()
    without, with_code = (UNet(ModelConfig(**{**ckpt["config"]["model"], "pos_emb": p})).eval() for p in (False, True))
    for m in (without, with_code):
        m.load_state_dict(ckpt["ema"])
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), without(x, t, labels))
        assert (model(x, t, labels) - with_code(x, t, labels)).abs().max() > 1e-4  # the code does change outputs
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run_train(out, "--resume", "--pos-emb", "--max-steps", "5")
    assert e.value.code == 2 and "--pos-emb True contradicts" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before
    run_train(out, "--resume", "--max-steps", "5")
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 5 and resumed["config"]["model"]["pos_emb"] is False


def test_resume_without_a_checkpoint_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "empty", "--resume")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: base checkpoint" in err and str(tmp_path / "empty" / "ckpt.pt") in err
