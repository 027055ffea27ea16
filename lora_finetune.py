"""Fine-tune a LoRA adapter on the attention projections of a trained UNet; the base stays frozen.

    python lora_finetune.py                        # italic digits on top of out/ckpt.pt -> out/lora.pt
    python lora_finetune.py --style bold --r 8 --alpha 8 --targets Wq,Wk,Wv,Wo
    python lora_finetune.py --style none           # the tutorial's setting: same data, no visible change
    python lora_finetune.py --resume               # carry on from out/lora.pt
    torchrun --nproc_per_node=2 lora_finetune.py   # only the LoRA parameters are synchronised

The adapter file holds only the lora_ tensors, r, alpha, targets and a fingerprint of the base
weights it was trained on (plus its optimizer state, for --resume): a few hundred KB next to a
base checkpoint of tens of MB. ``python denoise.py --lora --merge`` uses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from config import (CLIError, DiffusionConfig, LoraConfig, TrainConfig, add_config_args, add_preset_arg,
                    config_from_args, run_main)
from dataset import apply_style, ink, slant, to_model_range
from diffusion import Diffusion
from lora import add_lora, apply_adapter, load_adapter, mark_only_lora_as_trainable, save_adapter
from train import (cleanup_distributed, fit, load_dataset_distributed, make_optimizer, per_rank_batch,
                   resolve_precision, setup_distributed)
from unet import load_model, state_fingerprint

# the training flags that make sense for a fine-tune (the rest come from LoraConfig)
SHARED_TRAIN_FLAGS = ("dataset", "data_dir", "seed", "device", "precision", "label_drop", "batch_scope")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_preset_arg(p)
    p.add_argument("--ckpt", default=os.path.join("out", "ckpt.pt"), help="base checkpoint from train.py")
    p.add_argument("--out", default=os.path.join("out", "lora.pt"), help="where the adapter is written")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="base weights to adapt")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="ADAPTER",
                   help="continue from ADAPTER (default: --out) at its saved step")
    add_config_args(p, LoraConfig)
    add_config_args(p, TrainConfig, skip=[f for f in TrainConfig.__dataclass_fields__ if f not in SHARED_TRAIN_FLAGS])
    return p.parse_args(argv)


def check_resume_flags(args, adapter):
    for name in ("r", "alpha", "targets", "style"):
        given = getattr(args, name)
        saved = adapter["targets"] if name == "targets" else adapter.get(name, adapter.get("config", {}).get(name))
        if given is not None and (list(given) if name == "targets" else given) != saved:
            raise CLIError(f"--{name} {given} contradicts adapter {adapter['path']!r} (trained with {saved}); "
                           "drop the flag to resume, or write a new adapter with --out")


def main(argv=None):
    return run_main(finetune, parse_args(argv), cleanup_distributed)


def finetune(args):
    adapter = None
    if args.resume is not None:
        adapter = load_adapter(args.resume or args.out)
        check_resume_flags(args, adapter)
        # the adapter's own settings, not the preset's; flags given now (say --lora-steps) still win
        lcfg = config_from_args(args, LoraConfig, saved=adapter["config"])
        tcfg = config_from_args(args, TrainConfig, saved=adapter["train_config"])
    else:
        lcfg = config_from_args(args, LoraConfig, args.preset)
        tcfg = config_from_args(args, TrainConfig, args.preset)
    dist_info, device = setup_distributed(tcfg.device)
    precision = resolve_precision(tcfg.precision, device)
    log = print if dist_info.main else (lambda *a, **k: None)

    model, ckpt = load_model(args.ckpt, device, args.weights)
    fingerprint = state_fingerprint(ckpt[args.weights])
    base_copy = {k: v.clone() for k, v in model.state_dict().items()}  # to prove the base stays bit-identical
    dcfg = DiffusionConfig(**ckpt["config"]["diffusion"])
    diffusion = Diffusion.from_config(dcfg).to(device)

    if adapter is not None:
        apply_adapter(model, adapter, fingerprint)
    else:
        # seeded: A's random init is the same on every run, so torchrun and one process agree
        torch.manual_seed(tcfg.seed)
        add_lora(model, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.lora_dropout)
    trainable, total = mark_only_lora_as_trainable(model)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(lora_params, lcfg.lora_lr, 0.0, device)
    gen = torch.Generator().manual_seed(tcfg.seed + 2)
    step = 0
    if adapter is not None:
        opt.load_state_dict(adapter["optimizer"])
        gen.set_state(adapter["rng"]["noise"])
        step = adapter["step"]

    local_batch, global_batch = per_rank_batch(lcfg.lora_batch_size, tcfg.batch_scope, dist_info.world)
    data = load_dataset_distributed(tcfg.dataset, "train", tcfg.data_dir, dist_info, log)
    if len(data.classes) != model.num_classes:
        raise CLIError(f"{data.name} has {len(data.classes)} classes, the base model {model.num_classes}")
    if global_batch > len(data):
        raise CLIError(f"batch {global_batch} is larger than the {len(data)} images; lower --lora-batch-size")
    styled = apply_style(data.images, lcfg.style)
    x_all = to_model_range(styled, model.cfg.img_size).to(device)
    y_all = data.labels.to(device)

    fwd_model = model
    if dist_info.world > 1:
        # DDP all-reduces the gradients of parameters that require grad: the LoRA tensors. Told to
        # ignore the frozen base, it also skips broadcasting it at start-up (every rank loaded the
        # same file, and the check after fit() proves the base never changed)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    log(f"lora: base {args.ckpt} [{args.weights}] (fingerprint {fingerprint}), targets {list(lcfg.targets)}, "
        f"r={lcfg.r}, alpha={lcfg.alpha}, style {lcfg.style}")
    log(f"lora: trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%); "
        f"{data.name} slant {slant(data.images).mean():+.3f} -> styled {slant(styled).mean():+.3f}, "
        f"ink {ink(data.images).mean():.3f} -> {ink(styled).mean():.3f}")
    log(f"lora: {dist_info.world} process(es) x batch {local_batch} = global batch {global_batch}, "
        f"lr {lcfg.lora_lr}, steps {step}->{lcfg.lora_steps}, device {device}, {precision}")

    def save(epoch, step):
        if dist_info.main:
            save_adapter(args.out, model, lcfg.r, lcfg.alpha, lcfg.targets, fingerprint,
                         optimizer=opt.state_dict(), step=step, epoch=epoch, rng={"noise": gen.get_state()},
                         config=dataclasses.asdict(lcfg), train_config=dataclasses.asdict(tcfg), style=lcfg.style,
                         base_config=ckpt["config"], data_size=ckpt.get("data_size", 28))

    warmup = max(1, min(50, lcfg.lora_steps // 10))
    start = time.time()
    step, running = fit(fwd_model, lora_params, opt, diffusion, x_all, y_all, gen, step, lcfg.lora_steps,
                        global_batch, tcfg.seed, dist_info, device, precision,
                        lambda s: lcfg.lora_lr * min(1.0, (s + 1) / warmup), tcfg.label_drop, model.num_classes,
                        1.0, lambda e, s, last: save(e, s), on_interrupt=save, desc="lora",
                        resume_hint="python lora_finetune.py --resume", lr_flag="--lora-lr")
    # the frozen base is untouched: every non-LoRA tensor is bit-identical to what was loaded
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            base_key = k.replace(".net.", ".")
            assert torch.equal(v, base_copy[base_key]), f"base weight {k} changed during LoRA training"
    size = os.path.getsize(args.out) if dist_info.main else 0
    log(f"lora: done, {step} steps in {(time.time() - start) / 60:.1f} min, loss {running:.4f}; adapter "
        f"{args.out} ({size / 1024:.0f} KB, base checkpoint {os.path.getsize(args.ckpt) / 2**20:.1f} MB)")
    return args.out


if __name__ == "__main__":
    main()
