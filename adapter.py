"""Adapter files: what lora_finetune.py writes and denoise.py, evaluate.py and --resume read.

    save_adapter("out/lora.pt", model, r, alpha, targets, base_fingerprint, **extra)
    adapter = load_adapter("out/lora.pt")          # a dict: lora tensors, r, alpha, targets, fingerprint
    lora.apply_adapter(model, adapter, base_fingerprint)
"""
from __future__ import annotations

from checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from lora import LoraError, lora_state_dict


def save_adapter(path, model, r, alpha, targets, base_fingerprint, **extra):
    """Write the adapter atomically: lora_ tensors plus what is needed to re-attach it safely."""
    save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "lora", "lora": lora_state_dict(model), "r": int(r),
                     "alpha": float(alpha), "targets": list(targets), "base_fingerprint": base_fingerprint,
                     **extra}, path)


def load_adapter(path, map_location="cpu"):
    """Load and sanity-check an adapter file; every problem is a LoraError naming the file."""
    try:
        ad = load_checkpoint(path, map_location, kind="lora")
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    for key in ("lora", "r", "alpha", "targets", "base_fingerprint"):
        if key not in ad:
            raise LoraError(f"adapter {path!r} lacks {key!r}; it is corrupt or from another tool; re-create it")
    for k, v in ad["lora"].items():
        if k.endswith("lora_a") and v.shape[1] != ad["r"] or k.endswith("lora_b") and v.shape[0] != ad["r"]:
            raise LoraError(f"adapter {path!r}: {k} has shape {tuple(v.shape)}, inconsistent with r={ad['r']}")
    ad["path"] = path
    return ad
