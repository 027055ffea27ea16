"""Checkpoint files: the format, atomic writes, strict loading with named keys, and the base fingerprint.

A checkpoint is a plain dict of state_dicts, numbers and strings, never a pickled ``nn.Module``:

    {"version": 1, "kind": "base", "model": state_dict, "ema": state_dict, "optimizer": ...,
     "step": int, "rng": {...}, "config": {"model": {...}, "diffusion": {...}, "train": {...}}, ...}

It loads with ``torch.load(weights_only=True)``, so a file cannot run code, and the next stage
rebuilds the UNet from ``config`` (``load_model``), as nanoGPT's sample.py does.

    save_checkpoint(obj, path)          # temporary file, then os.replace: never a half-written file
    ckpt = load_checkpoint(path)        # every failure is one CheckpointError naming the file
    model, ckpt = load_model(path, device, weights="ema")
    pipe = load_for_sampling(path, device, adapters=[...])   # model (+ adapters), diffusion, data size
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import tempfile

import torch

from config import DiffusionConfig, ModelConfig, UserError
from diffusion import Diffusion
from unet import UNet

CHECKPOINT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, not ours, or from another model: the message says which."""


# ----------------------------------------------------------------- file writes

def atomic_write(path, write):
    """Call ``write(tmp_path)`` and move the result over ``path`` in one step (os.replace).

    A crash or Ctrl-C mid-write leaves the previous file intact, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """``obj`` as indented JSON, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def save_checkpoint(obj, path):
    """Write a plain dict of tensors and built-in types atomically (never a pickled nn.Module)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------- loading

def load_checkpoint(path, map_location="cpu", kind="base"):
    """Load a checkpoint dict with weights_only=True, turning every failure into one clear CheckpointError."""
    noun = {"base": "base checkpoint", "lora": "LoRA adapter"}.get(kind, f"{kind} checkpoint")
    if not os.path.exists(path):
        hint = "train one first: python train.py" if kind == "base" else "fine-tune one first: python lora_finetune.py"
        raise CheckpointError(f"{noun} {path!r} not found; {hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
        # torch raises these for truncated zips, random bytes and pickles of arbitrary objects
        # (an empty file gives an EOFError with an empty message, hence the fallback to its type)
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path!r} is not a readable checkpoint (truncated or corrupt? {reason}); "
                              "re-create it") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path!r} is not a {noun} (found {found!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path!r} has format version {ckpt.get('version')}, this code reads {CHECKPOINT_VERSION}")
    return ckpt


def load_state_strict(model, state, what):
    """load_state_dict(strict=True), with a message that names the keys and shapes that differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{'...' if len(shapes) > 3 else ''}")
        raise CheckpointError(f"{what} does not fit this model ({'; '.join(parts)}): it was built for another "
                              "model size; use the flags it was trained with, or retrain")
    model.load_state_dict(state, strict=True)


def model_config_from_checkpoint(ckpt):
    return ModelConfig(**ckpt["config"]["model"])


def load_model(path, map_location="cpu", weights="ema"):
    """Rebuild the UNet from a checkpoint's saved config and load its (EMA by default) weights, in eval mode."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be ema or model, got {weights!r}")
    ckpt = load_checkpoint(path, map_location)
    model = UNet(model_config_from_checkpoint(ckpt))
    load_state_strict(model, ckpt[weights], f"{path!r} [{weights}]")
    return model.to(map_location).eval(), ckpt


def state_fingerprint(state):
    """A short hash of a state dict's names, shapes and values: which base an adapter was trained on."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------ load for sampling

@dataclasses.dataclass
class Pipeline:
    """What sampling needs from a checkpoint: the model (adapters applied), its diffusion, and more."""
    model: torch.nn.Module
    diffusion: Diffusion
    ckpt: dict
    fingerprint: str  # of the base weights used, before any adapter
    data_size: int  # the data set's side: samples are resized back to it
    weights: str  # ema | model


def load_for_sampling(path, device, weights="ema", apply_adapters=None):
    """Load a base checkpoint for sampling: the UNet in eval mode, its diffusion schedule, its data size.

    ``apply_adapters(model, fingerprint)``, when given, attaches adapters to the fresh model (it
    checks each adapter against ``fingerprint``, the base weights' hash) before anything samples."""
    model, ckpt = load_model(path, device, weights)
    fingerprint = state_fingerprint(ckpt[weights])
    if apply_adapters is not None:
        apply_adapters(model, fingerprint)
    diffusion = Diffusion.from_config(DiffusionConfig(**ckpt["config"]["diffusion"])).to(device)
    return Pipeline(model, diffusion, ckpt, fingerprint, ckpt.get("data_size", 28), weights)
