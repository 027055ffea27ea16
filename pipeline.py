"""A base checkpoint with its adapters, ready to sample or fine-tune: one step above checkpoint.py and adapter.py.

    pipe = load_pipeline("out/ckpt.pt", device, "ema", load_adapters(args.lora), force=args.force)
    images, _ = generate(pipe.model, pipe.diffusion, labels, device, data_size=pipe.data_size)

Sampling (denoise.py, evaluate.py, lora_tools.py grid, the page) and fine-tuning (lora_finetune.py, on top of
the base) all start here.
"""
from __future__ import annotations

import dataclasses

import torch

from adapter import attach_adapters
from checkpoint import diffusion_config_from_checkpoint, load_model, state_fingerprint
from diffusion import Diffusion
from lora import BaseMismatch, LoraError


@dataclasses.dataclass
class Pipeline:
    """A base checkpoint made ready to use: the model (adapters applied), its diffusion, and more."""
    model: torch.nn.Module
    diffusion: Diffusion
    ckpt: dict
    fingerprint: str  # of the base weights used, before any adapter
    data_size: int  # the data set's side: samples are resized back to it
    weights: str  # ema | model


def load_pipeline(path, device, weights="ema", adapters=(), *, force=False, attach=None):
    """Load a base checkpoint as a Pipeline: the UNet in eval mode, its diffusion schedule, its data size.

    ``adapters`` (adapter.Adapter, each at its own ``weight``) are attached side by side, each checked
    against the base weights' fingerprint unless ``force``; ``attach(model, fingerprint)``, when given,
    then changes the fresh model otherwise (lora_finetune.py adds the layers it trains). Both happen before
    anything samples."""
    model, ckpt = load_model(path, device, weights)
    fingerprint = state_fingerprint(ckpt[weights])
    try:
        if adapters:
            attach_adapters(model, adapters, fingerprint, force=force)
        if attach is not None:
            attach(model, fingerprint)
    except BaseMismatch as e:
        other = "model" if weights == "ema" else "ema"
        if e.trained_on != state_fingerprint(ckpt[other]):
            raise
        names = {"ema": "EMA weights", "model": "raw (non-EMA) weights"}
        raise LoraError(f"adapter {e.path!r} was trained on this checkpoint's {names[other]}, and --weights "
                        f"{weights} picks its {names[weights]}, on which the adapter was never trained; "
                        f"pass --weights {other}") from None
    diffusion = Diffusion.from_config(diffusion_config_from_checkpoint(ckpt, path)).to(device)
    return Pipeline(model, diffusion, ckpt, fingerprint, ckpt.get("data_size", 28), weights)
