"""Fine-tune a LoRA adapter on the attention projections of a trained UNet; the base stays frozen.

    python lora_finetune.py                        # italic digits on top of out/ckpt.pt -> out/lora/
    python lora_finetune.py --style bold --r 8 --alpha 8 --targets Wq,Wk,Wv,Wo --out out/bold
    python lora_finetune.py --style none           # the tutorial's setting: same data, no visible change
    python lora_finetune.py --resume               # carry on from out/lora/ (its training_state.pt)
    python lora_finetune.py --full                 # every weight (at lr 3e-4) instead -> out/full.pt, a base checkpoint
    torchrun --nproc_per_node=2 lora_finetune.py   # only the LoRA parameters are synchronised

The adapter is a folder in PEFT's layout (adapter.py): adapter_model.safetensors with only the
lora_ tensors and, in its header, the fingerprint of the base weights it was trained on, beside
adapter_config.json (r, alpha, targets): tens of KB next to a base checkpoint of tens of MB.
The optimizer state and RNG for --resume go into training_state.pt beside them, never into the
shared file. ``python denoise.py --lora --merge`` uses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import time

import torch

from adapter import DEFAULT_ADAPTER, STATE_NAME, adapter_size, check_output_folder, load_adapter, load_training_state, save_adapter
from checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, load_for_sampling, save_checkpoint
from files import check_writable_dir, check_writable_file, same_file
from config import LoraConfig, TrainConfig
from cli import HelpFormatter, add_config_args, add_preset_arg, config_from_args
from errors import CLIError, run_main
from dataset import apply_style, ink, slant, to_model_range
from lora import add_lora, apply_adapter, mark_only_lora_as_trainable
from runtime import (cleanup_distributed, enable_tf32, per_rank_batch, rank0_logger, resolve_precision,
                     setup_distributed, wrap_ddp)
from trainer import Hooks, Loop, TrainData, fit, load_dataset_distributed, lora_lr_at, make_optimizer

# the training flags that make sense for a fine-tune (the rest come from LoraConfig)
SHARED_TRAIN_FLAGS = ("dataset", "data_dir", "seed", "device", "precision", "label_drop", "batch_scope")
FULL_DEFAULT = os.path.join("out", "full.pt")
# --full's learning rate when --lora-lr is not given: 600 steps of it, t drawn from all of T, moved the slant 92%
# of the way to real italic digits (README, "Levers measured")
FULL_LR = 3e-4
LORA_GRAD_CLIP = 1.0  # max gradient norm of the LoRA tensors, as for the base model


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_preset_arg(p)
    p.add_argument("--ckpt", default=os.path.join("out", "ckpt.pt"), help="base checkpoint from train.py")
    p.add_argument("--out", default=None, help=f"the adapter folder (default {DEFAULT_ADAPTER}; with --full "
                   f"{FULL_DEFAULT})")
    p.add_argument("--full", action="store_true", help="fine-tune every weight instead of an adapter and write a "
                   "base checkpoint (what lora_tools.py extract takes)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="base weights to adapt")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="ADAPTER",
                   help="continue from ADAPTER (default: --out) at its saved step")
    add_config_args(p, LoraConfig)
    add_config_args(p, TrainConfig, skip=[f for f in TrainConfig.__dataclass_fields__ if f not in SHARED_TRAIN_FLAGS])
    return p.parse_args(argv)


def lora_steps_range(fractions, timesteps):
    """--lora-t-range lo,hi (fractions of T) -> the steps (lo, hi) the fine-tune draws t from, lo <= t < hi."""
    lo, hi = (round(f * timesteps) for f in fractions)
    if hi <= lo:
        raise CLIError(f"--lora-t-range {fractions[0]:g},{fractions[1]:g} holds no step of this model's T={timesteps}; "
                       "widen it")
    return lo, hi


def check_resume_flags(args, adapter):
    for name in ("r", "alpha", "targets", "style"):
        given = getattr(args, name)
        saved = adapter["targets"] if name == "targets" else adapter.get(name, adapter.get("config", {}).get(name))
        if given is not None and (list(given) if name == "targets" else given) != saved:
            raise CLIError(f"--{name} {given} contradicts adapter {adapter['path']!r} (trained with {saved}); "
                           "drop the flag to resume, or write a new adapter with --out")


def check_out(args):
    """Before any work: --out can be written, and is neither the base it reads nor a file of another kind."""
    if args.full:
        check_writable_file(args.out, "--out")
        if same_file(args.out, args.ckpt):
            raise CLIError(f"--out {args.out!r} is the base checkpoint --ckpt reads; a fine-tune never writes over "
                           "its input: pass another --out")
        if os.path.exists(args.out):
            try:
                load_checkpoint(args.out)
            except CheckpointError as e:
                raise CLIError(f"--out {args.out!r} holds something other than a base checkpoint, so it is left as "
                               f"it is ({e}); pass another --out") from None
    else:
        check_output_folder(args.out)
        check_writable_dir(args.out, "--out")


def resume_hint(args):
    """The command that continues this fine-tune from what it saved (same base, same weights, same folder)."""
    if args.full:
        return "the same command again (a full fine-tune does not resume)"
    weights = f" --weights {args.weights}" if args.weights != "ema" else ""
    return (f"python lora_finetune.py --ckpt {shlex.quote(args.ckpt)}{weights} --resume {shlex.quote(args.out)} "
            f"--out {shlex.quote(args.out)}")


def main(argv=None):
    return run_main(finetune, parse_args(argv), cleanup_distributed)


def finetune(args):
    adapter = None
    if args.full and args.resume is not None:
        raise CLIError("--full cannot --resume: a full fine-tune is short; run it again")
    args.out = args.out or (FULL_DEFAULT if args.full else DEFAULT_ADAPTER)
    check_out(args)
    if args.resume is not None:
        adapter = load_adapter(args.resume or args.out)
        state = load_training_state(args.resume or args.out)
        # the state's own copy of the tensors: always the ones its optimizer state belongs to
        adapter = dict(adapter, lora=state["lora"], **{k: state[k] for k in ("optimizer", "rng", "step")})
        check_resume_flags(args, adapter)
        # the adapter's own settings, not the preset's; flags given now (say --lora-steps) still win
        lcfg = config_from_args(args, LoraConfig, saved=state["config"])
        tcfg = config_from_args(args, TrainConfig, saved=state["train_config"])
    else:
        lcfg = config_from_args(args, LoraConfig, args.preset)
        tcfg = config_from_args(args, TrainConfig, args.preset)
        if args.full and args.lora_lr is None:  # LoRA's rate would wreck every weight at once
            lcfg = dataclasses.replace(lcfg, lora_lr=FULL_LR)
    dist_info, device = setup_distributed(tcfg.device)
    precision = resolve_precision(tcfg.precision, device)
    enable_tf32(device)
    log = rank0_logger(dist_info)

    def attach(model, fingerprint):
        if args.full:
            return
        if adapter is not None:
            apply_adapter(model, adapter, fingerprint, force_flag=None)  # no --force here: resume on its own base
        else:
            # seeded: A's random init is the same on every run, so torchrun and one process agree
            torch.manual_seed(tcfg.seed)
            add_lora(model, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.lora_dropout)

    pipe = load_for_sampling(args.ckpt, device, args.weights, attach)
    model, diffusion, fingerprint = pipe.model, pipe.diffusion, pipe.fingerprint
    if args.full:
        model.requires_grad_(True)
        trainable = total = sum(p.numel() for p in model.parameters())
    else:
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
                           gen=torch.Generator().manual_seed(tcfg.seed + 2),
                           t_range=lora_steps_range(lcfg.lora_t_range, diffusion.timesteps))
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
        f"lr {lcfg.lora_lr}, steps {step}->{lcfg.lora_steps}, t drawn from {train_data.t_range[0]}.."
        f"{train_data.t_range[1] - 1}, device {device}, {precision}")

    def save(epoch, step):
        if not dist_info.main:
            return
        if args.full:
            # a base checkpoint that load_model reads; no EMA is kept, so "ema" holds the weights too
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "base", "model": weights, "ema": weights,
                             "step": step, "epoch": epoch, "config": pipe.ckpt["config"], "data_size": pipe.data_size,
                             "fine_tune": {"base_fingerprint": fingerprint, "style": lcfg.style,
                                           "config": dataclasses.asdict(lcfg)}}, args.out)
            return
        save_adapter(args.out, model, lcfg.r, lcfg.alpha, lcfg.targets, fingerprint, style=lcfg.style,
                     dropout=lcfg.lora_dropout,
                     training_state={"optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                                     "rng": {"noise": train_data.gen.get_state(), "torch": torch.get_rng_state()},
                                     "config": dataclasses.asdict(lcfg), "train_config": dataclasses.asdict(tcfg),
                                     "base_config": pipe.ckpt["config"], "data_size": pipe.data_size})

    start = time.time()
    loop = Loop(max_steps=lcfg.lora_steps, lr_fn=lambda s: lora_lr_at(s, lcfg), grad_clip=LORA_GRAD_CLIP,
                device=device, precision=precision, desc="lora",
                resume_hint=resume_hint(args),
                lr_flag="--lora-lr", checkpoint="" if args.full else os.path.join(args.out, STATE_NAME))
    hooks = Hooks(on_epoch_end=lambda e, s, last: save(e, s), on_interrupt=save)
    step, running = fit(fwd_model, opt, diffusion, train_data, loop, step, hooks)
    size = adapter_size(args.out) if dist_info.main else 0
    log(f"lora: done, {step} steps in {(time.time() - start) / 60:.1f} min, loss {running:.4f}; "
        f"{'full fine-tune' if args.full else 'adapter'} "
        f"{args.out} ({size / 1024:.0f} KB, base checkpoint {os.path.getsize(args.ckpt) / 2**20:.1f} MB)")
    return args.out


if __name__ == "__main__":
    main()
