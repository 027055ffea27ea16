"""Checkpoints and adapters move between devices through map_location; no .cuda calls in the project.

A checkpoint saved from one device type must load onto another: CPU <-> CPU with a device string
and a torch.device everywhere, and CPU <-> CUDA where a GPU is present (skipped otherwise). On a
GPU, an end-to-end test trains on CUDA, resumes on the CPU, and resumes a LoRA fine-tune on CUDA.

    python -m pytest -q tests/test_devices.py            # add --runslow for the end-to-end GPU test
"""
import contextlib
import io
import os
import re

import pytest
import torch

import denoise
import lora_finetune
import runtime
import train
from config import DiffusionConfig, ModelConfig, config_dict, preset_config
from errors import CLIError
from adapter import Adapter, adapter_from_model, add_adapter_layers, apply_adapter
from adapter_formats import load_adapter, load_training_state, write_adapter
from checkpoint import CHECKPOINT_VERSION, load_checkpoint, load_model, save_checkpoint, state_fingerprint
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")


def tiny_model(device="cpu"):
    return UNet(preset_config(ModelConfig, "tiny")).to(device).eval()


def save_base(model, path):
    """A base checkpoint in train.py's format, written from wherever the model's tensors live."""
    state = model.state_dict()
    save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "base", "model": state, "ema": state, "step": 0,
                     "config": config_dict(model.cfg, preset_config(DiffusionConfig, "tiny"))}, path)


@torch.no_grad()
def outputs(model):
    """The model's noise prediction on a fixed batch, on the CPU in fp32."""
    g = torch.Generator().manual_seed(1)
    cfg = model.cfg
    x = torch.randn(4, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g)
    t = torch.randint(0, 50, (4,), generator=g)
    labels = torch.tensor([0, 3, 7, cfg.num_classes])  # the last one is the null label
    device = next(model.parameters()).device
    return model(x.to(device), t.to(device), labels.to(device)).float().cpu()


def devices_of(obj):
    """Device types of every tensor in a (nested) checkpoint dict."""
    if torch.is_tensor(obj):
        return {obj.device.type}
    if isinstance(obj, dict):
        return set().union(*(devices_of(v) for v in obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(devices_of(v) for v in obj)) if obj else set()
    return set()


@pytest.fixture
def exact_fp32():
    """No TF32 while comparing CPU and GPU outputs (train.py turns it on); the flags are restored after."""
    if not HAS_CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------ CPU

@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
def test_checkpoint_round_trip_on_cpu(tmp_path, map_location):
    model = tiny_model()
    path = str(tmp_path / "ckpt.pt")
    save_base(model, path)
    assert devices_of(load_checkpoint(path, map_location)) == {"cpu"}
    loaded, _ = load_model(path, map_location, "model")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(outputs(loaded), outputs(model))


def test_pick_device():
    assert runtime.pick_device("cpu") == torch.device("cpu")
    if HAS_CUDA:
        assert runtime.pick_device("auto").type == "cuda"
    else:
        assert runtime.pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(CLIError, match="no CUDA GPU"):
            runtime.pick_device("cuda")


def test_no_dot_cuda_calls_in_the_project():
    """Device is picked once (runtime.pick_device) and passed down; a .cuda call would pin code to GPU 0."""
    pattern = re.compile(r"\." + "cuda" + r"\s*\(")  # spelled in pieces so this file does not match itself
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("data", "out", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if pattern.search(line):
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not offenders, "use .to(device) instead of .cuda calls:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------- CUDA

@needs_cuda
def test_cuda_checkpoint_loads_on_cpu(tmp_path, exact_fp32):
    model = tiny_model("cuda")
    path = str(tmp_path / "ckpt.pt")
    save_base(model, path)
    assert devices_of(torch.load(path, weights_only=True)) == {"cuda"}  # saved as it lay: on the GPU
    assert devices_of(load_checkpoint(path, "cpu")) == {"cpu"}
    loaded, _ = load_model(path, "cpu", "model")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("map_location", ["cuda", torch.device("cuda", 0)], ids=["str", "torch.device"])
def test_cpu_checkpoint_loads_on_cuda(tmp_path, exact_fp32, map_location):
    model = tiny_model("cpu")
    path = str(tmp_path / "ckpt.pt")
    save_base(model, path)
    assert devices_of(load_checkpoint(path, map_location)) == {"cuda"}
    loaded, _ = load_model(path, map_location, "model")
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=1e-4, atol=1e-4)


@needs_cuda
def test_lora_adapter_crosses_devices(tmp_path, exact_fp32):
    """An adapter trained on the GPU applies to the same base on the CPU, and the reverse."""
    base_path, ad_path = str(tmp_path / "ckpt.pt"), str(tmp_path / "lora")
    save_base(tiny_model("cpu"), base_path)
    for src, dst in (("cuda", "cpu"), ("cpu", "cuda")):
        model, ckpt = load_model(base_path, src, "ema")
        fingerprint = state_fingerprint(ckpt["ema"])
        spec = Adapter({}, 2, 2.0, targets=["Wq", "Wk", "Wv"], base_fingerprint=fingerprint)
        add_adapter_layers(model, spec)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)  # a non-zero B, so the adapter changes the output
        write_adapter(ad_path, adapter_from_model(model, spec))
        other, other_ckpt = load_model(base_path, dst, "ema")
        assert state_fingerprint(other_ckpt["ema"]) == fingerprint  # the fingerprint does not see the device
        apply_adapter(other, load_adapter(ad_path, dst), fingerprint)
        torch.testing.assert_close(outputs(other), outputs(model), rtol=1e-4, atol=1e-4)


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def quiet(main, args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = main(args)
    return result, buf.getvalue()


@needs_cuda
@pytest.mark.slow
def test_train_on_cuda_resume_on_cpu_and_lora_resume_on_cuda(tmp_path, restore_tf32):
    out = str(tmp_path / "out")
    common = ["--preset", "tiny", "--dataset", "mnist-5k", "--sample-every", "0", "--out-dir", out]
    _, text = quiet(train.main, common + ["--device", "cuda", "--max-steps", "2"])
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert "device cuda" in text and expected in text, text
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    ckpt_path = os.path.join(out, "ckpt.pt")
    assert devices_of(load_checkpoint(ckpt_path, "cpu")) == {"cpu"}
    # the GPU's checkpoint carries on on the CPU: model, optimizer state and noise generator
    _, text = quiet(train.main, common + ["--device", "cpu", "--precision", "fp32", "--max-steps", "3", "--resume"])
    assert "steps 2->3" in text, text
    assert load_checkpoint(ckpt_path)["step"] == 3
    # a LoRA fine-tune on the GPU, resumed on the GPU (the adapter is loaded onto cuda)
    ad_path = str(tmp_path / "lora")
    lora = ["--preset", "tiny", "--dataset", "mnist-5k", "--ckpt", ckpt_path, "--out", ad_path, "--device", "cuda"]
    quiet(lora_finetune.main, lora + ["--lora-steps", "1"])
    _, text = quiet(lora_finetune.main, lora + ["--lora-steps", "2", "--resume"])
    assert "steps 1->2" in text, text
    assert load_training_state(ad_path).step == 2
    # and both sample on the CPU
    written, _ = quiet(denoise.main, ["--ckpt", ckpt_path, "--lora", ad_path, "--merge", "--device", "cpu",
                                      "--steps", "3", "--frames", "0", "--out-dir", str(tmp_path / "samples")])
    assert all(os.path.exists(p) for p in written)
