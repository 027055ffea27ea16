"""Checkpoint files: the format, atomic writes, strict loading with named keys, and the base fingerprint.

A checkpoint is a plain dict of state_dicts, numbers and strings, never a pickled ``nn.Module``:

    {"version": 1, "kind": "base", "model": state_dict, "ema": state_dict, "optimizer": ...,
     "step": int, "rng": {...}, "config": {"model": {...}, "diffusion": {...}, "train": {...}}, ...}

It loads with ``torch.load(weights_only=True)``, so a file cannot run code, and the next stage
rebuilds the UNet from ``config`` (``load_model``), as nanoGPT's sample.py does.

    save_checkpoint(obj, path)          # temporary file, then os.replace: never a half-written file
    ckpt = load_checkpoint(path)        # every failure is one CheckpointError naming the file

Every file this module writes carries ``content_sha256``, a hash of all its tensors' bytes and
values, and ``load_checkpoint`` refuses a file whose contents no longer match it ("corrupt:
content hash differs"), a file with anything after the end of its zip archive, and a file that
holds objects other than tensors, numbers, strings and containers. Files written before the
hash existed have none and still load (their structure is checked, their values cannot be).
    model, ckpt = load_model(path, device, weights="ema")   # the UNet rebuilt from the saved config
"""
from __future__ import annotations

import hashlib
import os
import pickle
import struct

import torch

from config import CKPT_NAME, DiffusionConfig, ModelConfig, from_saved
from errors import UserError
from files import atomic_write, file_kind
from unet import UNet

CHECKPOINT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, not ours, or from another model: the message says which."""


# ----------------------------------------------------------------- saving

def save_checkpoint(obj, path):
    """Write a plain dict of tensors and built-in types atomically (never a pickled nn.Module), with its content hash."""
    obj = {k: v for k, v in obj.items() if k != HASH_KEY}
    obj[HASH_KEY] = content_sha256(obj)

    def write(tmp):
        # through a Python file object, so a failed write keeps its OSError (torch alone says "unexpected pos")
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


# ----------------------------------------------------------------- content hash

HASH_KEY = "content_sha256"


def content_sha256(obj):
    """SHA-256 of a checkpoint's contents: every key, number and string, and every tensor's dtype, shape and bytes.

    A deterministic walk (dict keys sorted), tensors read as raw bytes (so bf16 and every other dtype
    hash exactly), each item tagged and length-prefixed so no two different contents share a stream."""
    h = hashlib.sha256()
    _hash_into(h, obj)
    return h.hexdigest()


def _hash_into(h, obj):
    def put(tag, payload):  # payload: bytes, or a 1-D uint8 array (hashed without a copy)
        h.update(tag + struct.pack("<Q", len(payload)))
        h.update(payload)

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        put(b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        put(b"B", t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(obj, dict):
        put(b"D", str(len(obj)).encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _hash_into(h, k)
            _hash_into(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        put(b"L" if isinstance(obj, list) else b"U", str(len(obj)).encode())
        for v in obj:
            _hash_into(h, v)
    elif isinstance(obj, str):
        put(b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, bytes):
        put(b"Y", obj)
    else:  # None, bool, int, float, torch.Size, dtypes: their repr is exact (floats round-trip through repr)
        put(b"V", f"{type(obj).__name__}:{obj!r}".encode())


# ------------------------------------------------------------------ zip checks

def _zip_problem(path):
    """Why ``path`` is not a whole zip archive (torch.save's format), or None.

    torch's reader finds the archive's end by searching backwards, so bytes appended after it
    (a second file concatenated, a bad copy) would load unnoticed; here the end-of-central-directory
    record must end exactly at the end of the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - (22 + 65535)))
        tail = f.read()
    if size == 0:
        return "the file is empty"
    if head != b"PK\x03\x04":
        return "not a zip archive as torch.save writes; another kind of file?"
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(tail):
        return "its zip archive has no end record"
    comment = int.from_bytes(tail[end + 20:end + 22], "little")
    extra = len(tail) - (end + 22 + comment)
    if extra < 0:
        return "its zip archive ends early"
    if extra > 0:
        return f"{extra} bytes follow the end of its zip archive; data appended to it?"
    return None


# ---------------------------------------------------------------------- loading

def load_checkpoint(path, map_location="cpu", kind="base"):
    """Load a checkpoint dict with weights_only=True, turning every failure into one clear CheckpointError.

    Refused: a missing file or a folder, anything that is not one whole zip archive, objects other
    than tensors, numbers, strings and containers, contents that fail their hash, another kind or
    format version, and (for a base checkpoint) the fields the next stage needs missing or mistyped."""
    noun = {"base": "base checkpoint", "lora": "LoRA adapter"}.get(kind, f"{kind} checkpoint")
    if not os.path.exists(path):
        hint = "train one first: python train.py" if kind == "base" else "fine-tune one first: python lora_finetune.py"
        raise CheckpointError(f"{noun} {path!r} not found; {hint}")
    if os.path.isdir(path):
        if kind == "base" and file_kind(path) == "adapter folder":
            raise CheckpointError(f"{path!r} is a LoRA adapter folder, not a base checkpoint: pass it with --lora, "
                                  "and the base it was trained on (a ckpt.pt) with --ckpt")
        inside = os.path.join(path, CKPT_NAME)
        hint = f": pass {inside!r}, the checkpoint train.py wrote in it" if os.path.isfile(inside) else ""
        raise CheckpointError(f"{noun} {path!r} is a folder, not a checkpoint file{hint}")
    problem = _zip_problem(path)
    if problem:
        raise CheckpointError(f"{path!r} is not a readable {noun} (truncated or corrupt: {problem}); re-create it")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            # torch's own message goes on to suggest weights_only=False, which is how such a file runs its code
            raise CheckpointError(f"{path!r} holds objects that are not allowed to load; it is not a {noun} "
                                  "this code can read") from None
        raise CheckpointError(f"{path!r} is not a readable {noun} (truncated or corrupt: "
                              f"{_first_line(e)}); re-create it") from None
    except Exception as e:  # noqa: BLE001 -- damaged bytes make torch's unpickler raise almost anything
        # (IndexError, KeyError, AttributeError, RuntimeError, EOFError, ...): all of them mean a damaged file
        raise CheckpointError(f"{path!r} is not a readable {noun} (truncated or corrupt: "
                              f"{_first_line(e)}); re-create it") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path!r} is not a {noun} (found {type(ckpt).__name__!r})")
    if HASH_KEY in ckpt:
        stored = ckpt.pop(HASH_KEY)
        if stored != content_sha256(ckpt):
            raise CheckpointError(f"{path!r} is corrupt: content hash differs (the file changed after it was "
                                  "written); re-create it or use another copy")
    if ckpt.get("kind") != kind:
        found = {"base": "a base checkpoint (what --ckpt takes)", "lora": "a LoRA adapter (what --lora takes)"}.get(
            ckpt.get("kind"), repr(ckpt.get("kind")))
        raise CheckpointError(f"{path!r} is not a {noun}: it is {found}")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path!r} has format version {ckpt.get('version')!r}, this code reads "
                              f"{CHECKPOINT_VERSION}")
    if kind == "base":
        _check_base_fields(ckpt, path)
    return ckpt


def _first_line(e):
    # an empty file gives an EOFError with an empty message, hence the fallback to its type
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_base_fields(ckpt, path):
    """The fields the next stage reads, with the right types: a foreign or damaged file fails here, not deep inside."""
    def bad(what):
        raise CheckpointError(f"{path!r} is not a usable base checkpoint: {what}; re-create it")

    config = ckpt.get("config")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "diffusion")):
        bad("its 'config' lacks the model and diffusion settings")
    for part in ("model", "ema"):
        state = ckpt.get(part)
        if not isinstance(state, dict) or not state:
            bad(f"'{part}' is not a state dict")
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            bad(f"'{part}' holds something other than named tensors")
        if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in state.values()):
            bad(f"'{part}' holds NaN or infinite weights")
    if not isinstance(ckpt.get("step"), int) or isinstance(ckpt.get("step"), bool) or ckpt["step"] < 0:
        bad(f"its step {ckpt.get('step')!r} is not a count")
    size = ckpt.get("data_size", 28)
    if not isinstance(size, int) or size <= 0:
        bad(f"its data_size {size!r} is not a positive integer")


def load_state_strict(model, state, what):
    """load_state_dict(strict=True), with a message that names the keys and shapes that differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    # a value of another dtype would be cast silently on loading (fp16 weights lose bits, floats in an int buffer)
    dtypes = [f"{k}: {state[k].dtype} vs model {own[k].dtype}" for k in own
              if k in state and state[k].dtype != own[k].dtype]
    if missing or extra or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{'...' if len(shapes) > 3 else ''}")
        if dtypes:
            parts.append(f"dtype mismatch {dtypes[:3]}{'...' if len(dtypes) > 3 else ''}")
        raise CheckpointError(f"{what} does not fit this model ({'; '.join(parts)}): it was built for another "
                              "model size; use the flags it was trained with, or retrain")
    model.load_state_dict(state, strict=True)


def model_config_from_checkpoint(ckpt, path="checkpoint"):
    return _config(ModelConfig, ckpt["config"]["model"], path)


def diffusion_config_from_checkpoint(ckpt, path="checkpoint"):
    return _config(DiffusionConfig, ckpt["config"]["diffusion"], path)


def _config(cls, saved, path):
    """A dataclass from a checkpoint's saved settings; settings it does not accept are a CheckpointError."""
    try:
        return from_saved(cls, saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r} holds {cls.__name__} settings this code cannot build ({e})") from None


def load_model(path, map_location="cpu", weights="ema"):
    """Rebuild the UNet from a checkpoint's saved config and load its (EMA by default) weights, in eval mode."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be ema or model, got {weights!r}")
    ckpt = load_checkpoint(path, map_location)
    model = UNet(model_config_from_checkpoint(ckpt, path))
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
