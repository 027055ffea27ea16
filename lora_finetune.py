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

from adapter import load_adapter, save_adapter
from checkpoint import load_for_sampling
from config import CLIError, LoraConfig, TrainConfig, add_config_args, add_preset_arg, config_from_args, run_main
from dataset import apply_style, ink, slant, to_model_range
from lora import add_lora, apply_adapter, mark_only_lora_as_trainable
from runtime import (cleanup_distributed, enable_tf32, per_rank_batch, rank0_logger, resolve_precision,
                     setup_distributed, wrap_ddp)
from trainer import Hooks, Loop, TrainData, fit, load_dataset_distributed, lora_lr_at, make_optimizer

# the training flags that make sense for a fine-tune (the rest come from LoraConfig)
SHARED_TRAIN_FLAGS = ("dataset", "data_dir", "seed", "device", "precision", "label_drop", "batch_scope")
LORA_GRAD_CLIP = 1.0  # max gradient norm of the LoRA tensors, as for the base model


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
    enable_tf32(device)
    log = rank0_logger(dist_info)

    def attach(model, fingerprint):
        if adapter is not None:
            apply_adapter(model, adapter, fingerprint)
        else:
            # seeded: A's random init is the same on every run, so torchrun and one process agree
            torch.manual_seed(tcfg.seed)
            add_lora(model, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.lora_dropout)

    pipe = load_for_sampling(args.ckpt, device, args.weights, attach)
    model, diffusion, fingerprint = pipe.model, pipe.diffusion, pipe.fingerprint
    trainable, total = mark_only_lora_as_trainable(model)
    opt = make_optimizer(model.parameters(), lcfg.lora_lr, 0.0, device)

    local_batch, global_batch = per_rank_batch(lcfg.lora_batch_size, tcfg.batch_scope, dist_info.world)
    data = load_dataset_distributed(tcfg.dataset, "train", tcfg.data_dir, dist_info, log)
    if len(data.classes) != model.num_classes:
        raise CLIError(f"{data.name} has {len(data.classes)} classes, the base model {model.num_classes}")
    if global_batch > len(data):
        raise CLIError(f"batch {global_batch} is larger than the {len(data)} images; lower --lora-batch-size")
    styled = apply_style(data.images, lcfg.style)
    train_data = TrainData(images=to_model_range(styled, model.cfg.img_size).to(device),
                           labels=data.labels.to(device), global_batch=global_batch, seed=tcfg.seed,
                           label_drop=tcfg.label_drop, null_label=model.num_classes, dist=dist_info,
                           gen=torch.Generator().manual_seed(tcfg.seed + 2))
    step = 0
    if adapter is not None:
        opt.load_state_dict(adapter["optimizer"])
        train_data.gen.set_state(adapter["rng"]["noise"])
        if "torch" in adapter["rng"]:
            torch.set_rng_state(adapter["rng"]["torch"])
        step = adapter["step"]
    # DDP all-reduces the gradients of the LoRA tensors only; the frozen base is ignored
    fwd_model = wrap_ddp(model, dist_info, device, frozen_ignored=True)

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
                         optimizer=opt.state_dict(), step=step, epoch=epoch,
                         rng={"noise": train_data.gen.get_state(), "torch": torch.get_rng_state()},
                         config=dataclasses.asdict(lcfg), train_config=dataclasses.asdict(tcfg), style=lcfg.style,
                         base_config=pipe.ckpt["config"], data_size=pipe.data_size)

    start = time.time()
    loop = Loop(max_steps=lcfg.lora_steps, lr_fn=lambda s: lora_lr_at(s, lcfg), grad_clip=LORA_GRAD_CLIP,
                device=device, precision=precision, desc="lora",
                resume_hint=f"python lora_finetune.py --ckpt {args.ckpt} --resume {args.out} --out {args.out}",
                lr_flag="--lora-lr")
    hooks = Hooks(on_epoch_end=lambda e, s, last: save(e, s), on_interrupt=save)
    step, running = fit(fwd_model, opt, diffusion, train_data, loop, step, hooks)
    size = os.path.getsize(args.out) if dist_info.main else 0
    log(f"lora: done, {step} steps in {(time.time() - start) / 60:.1f} min, loss {running:.4f}; adapter "
        f"{args.out} ({size / 1024:.0f} KB, base checkpoint {os.path.getsize(args.ckpt) / 2**20:.1f} MB)")
    return args.out


if __name__ == "__main__":
    main()
