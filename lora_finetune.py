"""Fine-tune a LoRA adapter on the attention projections of a trained UNet; the base stays frozen.

    python lora_finetune.py                        # italic digits on top of out/ckpt.pt -> out/lora/
    python lora_finetune.py --style bold --r 8 --alpha 8 --targets Wq,Wk,Wv,Wo --out out/bold
    python lora_finetune.py --style none           # the tutorial's setting: same data, no visible change
    python lora_finetune.py --data my_digits       # your own digits, my_digits/0..9/*.png (or an .npz) -> out/lora/
    python lora_finetune.py --style "font:DejaVu Serif Bold"   # a font's digits (an unknown name lists them)
    python lora_finetune.py --resume               # carry on from out/lora/ (its training_state.pt)
    python lora_finetune.py --full                 # every weight (at lr 3e-4) instead -> out/full.pt, a base checkpoint
    python lora_finetune.py --distill lcm --out out/lcm   # a speed adapter: --sampler lcm in 1-8 steps (distill.py)
    torchrun --nproc_per_node=2 lora_finetune.py   # only the LoRA parameters are synchronised

The adapter is a folder in PEFT's layout (adapter.py): adapter_model.safetensors with only the
lora_ tensors and, in its header, the fingerprint of the base weights it was trained on, beside
adapter_config.json (r, alpha, targets): tens of KB next to a base checkpoint of tens of MB.
The optimizer state and RNG for --resume go into training_state.pt beside them, never into the
shared file. ``python denoise.py --lora --merge`` uses it. Beside it, as it trains: loss.csv (a row per
step), previews/step_NNNN.png (the base against the adapter on the same noise, --preview-every), and
loss_curve.png at the end (with --full: out/full_loss.csv and so on).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from typing import Callable, Optional

import torch

from adapter import Adapter, TrainingState, adapter_from_model, add_adapter_layers, apply_adapter
from adapter_formats import (STATE_NAME, adapter_size, check_adapter_folder, load_adapter, load_training_state,
                             write_adapter)
from checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from pipeline import load_pipeline
from files import (check_apart, check_not_in_use, check_replace, check_writable_dir, check_writable_file,
                   lock_output, remove_stale_temps, same_thing)
from inputs import check_inputs_apart
from config import (DEFAULT_ADAPTER, DEFAULT_CKPT, DEFAULT_OUT_DIR, STEPS_MAX, DistillConfig, LoraConfig, RuntimeConfig,
                    TrainConfig, saved_runtime)
from distill import distill, refuse_distill_flags
from cli import (ArgumentParser, add_config_args, add_config_file_arg, add_preset_arg, add_runtime_args, bounded,
                 config_file_note, config_from_args, path_arg, runtime_from_args)
from errors import CLIError, run_main
from dataset import apply_style, to_model_range
from logs import (PREVIEW_DIR, TENSORBOARD_DIR, TENSORBOARD_HINT, LogPaths, LossLog, Previews, fork_rng,
                  loss_curve_png, require_tensorboard)
from lora import mark_only_lora_as_trainable
from metrics import ink, slant
from model_card import CardFacts, write_card
from pictures import DATA_PREVIEW_NAME, training_preview_png
from style_training import check_style_count, load_style_data, sized_steps, training_set
from runtime import (Dist, check_precision, enable_tf32, end_run, per_rank_batch, rank0_logger,
                     resolve_precision, setup_distributed, wrap_ddp)
from trainer import (LORA_GRAD_CLIP, FitSettings, Hooks, TrainData, fit, load_dataset_distributed, lora_lr_at,
                     make_optimizer, precision_probe)

# the training flags that make sense for a fine-tune (the rest come from LoraConfig)
SHARED_TRAIN_FLAGS = ("dataset", "data_dir", "label_drop", "batch_scope")
FULL_DEFAULT = os.path.join(DEFAULT_OUT_DIR, "full.pt")
# --full's learning rate when --lora-lr is not given: 600 steps of it, t drawn from all of T, was the recipe that
# moved every weight's slant furthest (experiments/lora_studies/notes.md, the --full row)
FULL_LR = 3e-4
PREVIEW_EVERY = 50  # six previews over the default 300 steps


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_preset_arg(p)
    add_config_file_arg(p)  # its [lora], [train] and [runtime] sections
    model, lora, out = p.group("model"), p.group("LoRA"), p.group("output")
    model.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg, help="base checkpoint from train.py")
    out.add_argument("--out", default=None, type=path_arg, help=f"the adapter folder (default {DEFAULT_ADAPTER}; "
                     f"with --full {FULL_DEFAULT})")
    lora.add_argument("--full", action="store_true", help="fine-tune every weight instead of an adapter and write a "
                      "base checkpoint (what lora_tools.py extract takes)")
    model.add_argument("--weights", default="ema", choices=["ema", "model"], help="base weights to adapt")
    lora.add_argument("--resume", nargs="?", const="", default=None, metavar="ADAPTER",  # "": --out's, as bare
                      help="continue from ADAPTER (default: --out) at its saved step")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the adapter (or --full checkpoint) already at --out instead of refusing")
    out.add_argument("--preview-every", type=bounded(int, ge=0, le=STEPS_MAX), default=PREVIEW_EVERY, metavar="N",
                     help="every N steps, a grid of the base against the adapter on the same noise in "
                     f"OUT/{PREVIEW_DIR}/ (0: none)")
    out.add_argument("--tensorboard", action="store_true",
                     help=f"also write TensorBoard events to OUT/{TENSORBOARD_DIR} (needs: {TENSORBOARD_HINT})")
    lora.add_argument("--distill", choices=["lcm"], default=None, help="lcm: distil the base's guided sampling into "
                      "a speed adapter (latent consistency distillation), sampled with --sampler lcm in 1-8 steps")
    add_config_args(p, LoraConfig)
    add_config_args(p, DistillConfig)
    add_config_args(p, TrainConfig, skip=[f for f in TrainConfig.__dataclass_fields__ if f not in SHARED_TRAIN_FLAGS])
    add_runtime_args(p)
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def lora_steps_range(fractions, timesteps):
    """--lora-t-range lo,hi (fractions of T) -> the steps (lo, hi) the fine-tune draws t from, lo <= t < hi."""
    lo, hi = (round(f * timesteps) for f in fractions)
    if hi <= lo:
        raise CLIError(f"--lora-t-range {fractions[0]:g},{fractions[1]:g} holds no step of this model's T={timesteps}; "
                       "widen it")
    return lo, hi


def check_flags_match_adapter(args, adapter, state):
    saved = {"r": adapter.r, "alpha": adapter.alpha, "style": adapter.style,
             "targets": list(state.config.get("targets") or adapter.targets or [])}  # as given, e.g. Wq,Wk,Wv
    for name, value in saved.items():
        given = getattr(args, name)
        if given is not None and (list(given) if name == "targets" else given) != value:
            raise CLIError(f"--{name} {given} contradicts adapter {adapter.path!r} (trained with {value}); "
                           "drop the flag to resume, or write a new adapter with --out")


def check_outputs(args):
    """Before any work: --out can be written, is none of the files it reads, holds nothing of another kind, and
    replaces an earlier result only with --overwrite (or when it continues the very adapter it resumes)."""
    resume = None if args.resume is None else (args.resume or args.out)
    in_place = resume is not None and same_thing(resume, args.out)
    inputs = [("--ckpt", args.ckpt), ("--config", args.config)] + ([] if in_place else [("--resume", resume)])
    check_not_in_use(args.out, "--out", folder=not args.full)
    if args.full:
        check_writable_file(args.out, "--out")
        check_apart([("--out", args.out)], inputs, "pass another --out")
        if os.path.exists(args.out):
            try:
                load_checkpoint(args.out)
            except CheckpointError as e:
                raise CLIError(f"--out {args.out!r} holds something other than a base checkpoint, so it is left as "
                               f"it is ({e}); pass another --out") from None
            check_replace(args.out, "--out", ("checkpoint",), args.overwrite, "a base checkpoint")
    else:
        check_adapter_folder(args.out)
        check_writable_dir(args.out, "--out")
        check_apart([("--out", args.out)], inputs, "pass another --out")
        check_replace(args.out, "--out", ("adapter folder",), None if in_place else args.overwrite, "an adapter")


def resume_hint(args):
    """The command that continues this fine-tune from what it saved (same base, same weights, same folder)."""
    if args.full:
        return "the same command again (a full fine-tune does not resume)"
    weights = f" --weights {args.weights}" if args.weights != "ema" else ""
    return (f"python lora_finetune.py --ckpt {shlex.quote(args.ckpt)}{weights} --resume {shlex.quote(args.out)} "
            f"--out {shlex.quote(args.out)}")


def load_own_data(args, lcfg, resuming, log):
    """--data or --style font:NAME: the style data, read and checked before any model is built; the settings with
    the style named after it ("data:FOLDER", "font:NAME" as found) and, when --lora-steps is not given, steps
    sized to it (style_training.sized_steps). (lcfg, None) for the transforms of MNIST."""
    spec = lcfg.data or (lcfg.style if lcfg.style.startswith("font:") else "")
    if not spec:
        unused = [f"--{n.replace('_', '-')}" for n in ("augment", "prior_weight") if getattr(args, n) is not None]
        if unused:
            raise CLIError(f"{' and '.join(unused)} applies to --data or --style font:NAME, not to --style "
                           f"{lcfg.style} (a transform of all of MNIST): drop it")
        return lcfg, None
    if lcfg.data and args.style is not None and not resuming:
        raise CLIError(f"--data and --style {args.style} both give the fine-tune's digits; pass one")
    if lcfg.data:
        check_inputs_apart([("--out", args.out)], [("--data", lcfg.data)], "pass another --out")
    # a font's pages from seed 0 whatever --seed: the very set `lora_tools.py render-style font:NAME` writes
    own = check_style_count(load_style_data(spec, seed=0, log=log), f"--data {lcfg.data}" if lcfg.data else spec)
    steps = lcfg.lora_steps
    if args.lora_steps is None and not resuming:  # a resumed run keeps the steps it was sized to
        steps = sized_steps(len(own), lcfg.lora_steps)
    # the folder's absolute path is saved with the run, so that --resume from another directory finds it
    data = os.path.abspath(lcfg.data) if lcfg.data else ""
    return dataclasses.replace(lcfg, style=own.name, lora_steps=steps, data=data), own


def main(argv=None):
    args = parse_args(argv)
    # the command as typed, for the model card (an in-process call's argv, or the shell's)
    args.command = shlex.join(["python", "lora_finetune.py", *(sys.argv[1:] if argv is None else argv)])
    return run_main(finetune, args, end_run)


@dataclasses.dataclass
class FinetuneRun:
    """What every step of a fine-tune reads: the flags, the settings, where it runs, how it logs, and what it
    resumes (the adapter and its training state, or None for a fresh one)."""
    args: argparse.Namespace
    lcfg: LoraConfig
    tcfg: TrainConfig
    rcfg: RuntimeConfig
    dist_info: Dist
    device: torch.device
    log: Callable
    adapter: Optional[Adapter] = None
    state: Optional[TrainingState] = None
    own: object = None  # the --data / --style font:NAME digits (styles.StyleData), None for MNIST's transforms


def finetune(args):
    """Check, load the base with an adapter on it, train it with trainer.fit, save; returns the output path."""
    run = start_run(args)
    if run is None:
        return distill(args)
    slot = AdapterSlot(run)
    pipe = load_pipeline(args.ckpt, run.device, args.weights, attach=slot)
    model, diffusion = pipe.model, pipe.diffusion
    if args.full:
        model.requires_grad_(True)
        trainable = total = sum(p.numel() for p in model.parameters())
    else:
        trainable, total = mark_only_lora_as_trainable(model)
    opt = make_optimizer(model.parameters(), run.lcfg.lora_lr, 0.0, run.device)
    local_batch, global_batch = per_rank_batch(run.lcfg.lora_batch_size, run.tcfg.batch_scope, run.dist_info.world)
    data, styled, own_set, train_data = load_finetune_data(run, model, diffusion, global_batch)
    step = restore_state(run, opt, train_data)
    # decided once, as in train.py: auto on CUDA times this fine-tune's step in both precisions, rank 0 decides
    probe = precision_probe(model, diffusion, train_data, diffusion.timesteps, local_batch, run.device)
    precision = resolve_precision(run.rcfg.precision, run.device, probe, run.log, run.dist_info)
    # DDP all-reduces the gradients of the LoRA tensors only; the frozen base is ignored
    fwd_model = wrap_ddp(model, run.dist_info, run.device, frozen_ignored=True)
    log_start(run, pipe.fingerprint, data=data, styled=styled, trainable=trainable, total=total,
              local_batch=local_batch, global_batch=global_batch, train_data=train_data, step=step,
              precision=precision)

    start = time.time()
    save = FinetuneSaver(run, pipe, model, opt, train_data, slot, own_set)
    settings = FitSettings(max_steps=run.lcfg.lora_steps, lr_fn=lambda s: lora_lr_at(s, run.lcfg),
                           grad_clip=LORA_GRAD_CLIP, device=run.device, precision=precision, desc="lora",
                           resume_hint=resume_hint(args), lr_flag="--lora-lr",
                           checkpoint="" if args.full else os.path.join(args.out, STATE_NAME))
    hooks = Hooks(on_epoch_end=lambda e, s, last: save(e, s), on_interrupt=save)
    paths = LogPaths.of(args.out, folder=not args.full)
    loss_log = open_loss_log(run, pipe, model, paths, hooks, global_batch, step, precision)
    try:
        step, running = fit(fwd_model, opt, diffusion, train_data, settings, step, hooks)
    finally:
        if loss_log is not None:
            loss_log.close()
    save.write_card()  # again after the last preview, which the last save may precede
    log_done(run, paths, step, running, start)
    return args.out


def start_run(args):
    """The checks that need no model, the settings (from the flags, or on --resume from the adapter), the device,
    and the style data; nothing is written yet."""
    adapter = state = None
    if args.full and args.resume is not None:
        raise CLIError("--full cannot --resume: a full fine-tune is short; run it again")
    if args.config and args.resume is not None:
        raise CLIError("--resume carries on with the adapter's own settings; --config starts a new fine-tune "
                       "(drop one of them)")
    if args.preview_every < 0:
        raise CLIError(f"--preview-every must be >= 0 (0: no previews), got {args.preview_every}")
    if args.tensorboard:
        require_tensorboard()
    args.out = args.out or (FULL_DEFAULT if args.full else DEFAULT_ADAPTER)
    check_outputs(args)
    if args.distill:
        return None  # distill.py's own loop takes it from here
    refuse_distill_flags(args)
    if args.resume is not None:
        adapter = load_adapter(args.resume or args.out)
        state = load_training_state(args.resume or args.out)
        # the state's own copy of the tensors: always the ones its optimizer state belongs to
        adapter = adapter.replace(tensors=state.tensors)
        check_flags_match_adapter(args, adapter, state)
        # the adapter's own settings, not the preset's; flags given now (say --lora-steps) still win
        lcfg = config_from_args(args, LoraConfig, saved=state.config)
        tcfg = config_from_args(args, TrainConfig, saved=state.train_config)
        rcfg = runtime_from_args(args, saved=saved_runtime(None, state.train_config))  # saved beside tcfg's
    else:
        lcfg = config_from_args(args, LoraConfig, args.preset)
        tcfg = config_from_args(args, TrainConfig, args.preset)
        rcfg = runtime_from_args(args)
        if args.full and args.lora_lr is None:  # LoRA's rate would wreck every weight at once
            lcfg = dataclasses.replace(lcfg, lora_lr=FULL_LR)
    dist_info, device = setup_distributed(rcfg.device)
    check_precision(rcfg.precision, device)
    enable_tf32(device)
    log = rank0_logger(dist_info)
    lcfg, own = load_own_data(args, lcfg, adapter is not None, log)
    return FinetuneRun(args, lcfg, tcfg, rcfg, dist_info, device, log, adapter, state, own)


class AdapterSlot:
    """The adapter being trained, attached to the fresh base by load_pipeline: its settings (rank, alpha,
    targets...) travel in ``spec``, this one object, to the file. Nothing is attached with --full."""

    def __init__(self, run):
        self.run = run
        args, adapter = run.args, run.adapter
        self.spec = (adapter.replace(base_path=args.ckpt, base_name=os.path.basename(args.ckpt))
                     if adapter else None)

    def __call__(self, model, fingerprint):
        run = self.run
        if run.args.full:
            return
        if run.adapter is not None:
            # no --force here: resume on its own base; the file then names the modules it adapts
            self.spec.targets = list(apply_adapter(model, run.adapter, fingerprint, force_flag=None))
        else:
            # seeded: A's random init is the same on every run, so torchrun and one process agree
            torch.manual_seed(run.rcfg.seed)
            self.spec = Adapter.new(run.lcfg, fingerprint, base_path=run.args.ckpt)
            add_adapter_layers(model, self.spec)


def load_finetune_data(run, model, diffusion, global_batch):
    """The digits it trains on (MNIST in its style, or the style data with its prior), checked against the base,
    on the device; then, the inputs being good, the lock on --out. Returns (data, styled, own_set, TrainData)."""
    args, lcfg, tcfg, rcfg, log = run.args, run.lcfg, run.tcfg, run.rcfg, run.log
    data = load_dataset_distributed(tcfg.dataset, "train", tcfg.data_dir, run.dist_info, log)
    if len(data.classes) != model.num_classes:
        raise CLIError(f"{data.name} has {len(data.classes)} classes, the base model {model.num_classes}")
    if global_batch > len(data):
        raise CLIError(f"batch {global_batch} is larger than the {len(data)} images; lower --lora-batch-size")
    if run.dist_info.main:  # the inputs are good: one run at a time on --out, then what a killed one left beside it
        lock_output(args.out, "--out", folder=not args.full, log=log)
        remove_stale_temps(os.path.dirname(os.path.abspath(args.out)), log)
    own_set = None
    if run.own is None:
        styled, labels = apply_style(data.images, lcfg.style), data.labels
    else:
        own_set = training_set(run.own, data.images, data.labels, augment_mode=lcfg.augment,
                               prior_weight=lcfg.prior_weight, min_size=global_batch, seed=rcfg.seed)
        styled, labels = own_set.images, own_set.labels
        log(f"lora: trains on {own_set.summary(lcfg.prior_weight)}")
    train_data = TrainData(images=to_model_range(styled, model.cfg.img_size).to(run.device),
                           labels=labels.to(run.device), global_batch=global_batch, seed=rcfg.seed,
                           label_drop=tcfg.label_drop, null_label=model.num_classes, dist=run.dist_info,
                           gen=torch.Generator().manual_seed(rcfg.seed + 2),
                           t_range=lora_steps_range(lcfg.lora_t_range, diffusion.timesteps))
    return data, styled, own_set, train_data


def restore_state(run, opt, train_data):
    """On --resume: the optimizer and the random streams where the adapter's run left them; the step to go on."""
    if run.adapter is None:
        return 0
    state = run.state
    opt.load_state_dict(state.optimizer)
    train_data.gen.set_state(state.rng["noise"])
    if "torch" in state.rng:
        torch.set_rng_state(state.rng["torch"])
    return state.step


def log_start(run, fingerprint, *, data, styled, trainable, total, local_batch, global_batch, train_data, step,
              precision):
    """The summary lines at the start: the base, the adapter's settings, what it trains on, the batch and steps."""
    args, lcfg, log = run.args, run.lcfg, run.log
    if config_file_note(args):
        log(f"lora: {config_file_note(args)}")
    log(f"lora: base {args.ckpt} [{args.weights}] (fingerprint {fingerprint}), targets {list(lcfg.targets)}, "
        f"r={lcfg.r}, alpha={lcfg.alpha}, style {lcfg.style}")
    log(f"lora: trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%); "
        f"{data.name} slant {slant(data.images).mean():+.3f} -> styled {slant(styled).mean():+.3f}, "
        f"ink {ink(data.images).mean():.3f} -> {ink(styled).mean():.3f}")
    log(f"lora: {run.dist_info.world} process(es) x batch {local_batch} = global batch {global_batch}, "
        f"lr {lcfg.lora_lr}, steps {step}->{lcfg.lora_steps}, t drawn from {train_data.t_range[0]}.."
        f"{train_data.t_range[1] - 1}, device {run.device}, {precision}")


class FinetuneSaver:
    """``save(epoch, step)``: the adapter folder (with its training state) or, with --full, a base checkpoint;
    rank 0 alone writes. The style data's preview goes with the first save, so that a run stopped before it
    leaves no folder holding a preview alone."""

    def __init__(self, run, pipe, model, opt, train_data, slot, own_set):
        self.run, self.pipe, self.model, self.opt = run, pipe, model, opt
        self.train_data, self.slot, self.own_set = train_data, slot, own_set
        out = run.args.out
        self.preview_path = (f"{os.path.splitext(out)[0]}_{DATA_PREVIEW_NAME}" if run.args.full
                             else os.path.join(out, DATA_PREVIEW_NAME))
        self.previews_written = set()
        self.trained = self.step = None  # the adapter last saved, and its step: the card describes it

    def __call__(self, epoch, step):
        run, pipe = self.run, self.pipe
        if not run.dist_info.main:
            return
        lcfg, out = run.lcfg, run.args.out
        if run.args.full:
            # a base checkpoint that load_model reads; no EMA is kept, so "ema" holds the weights too
            weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "base", "model": weights, "ema": weights,
                             "step": step, "epoch": epoch, "config": pipe.ckpt["config"], "data_size": pipe.data_size,
                             "fine_tune": {"base_fingerprint": pipe.fingerprint, "style": lcfg.style,
                                           "config": dataclasses.asdict(lcfg)}}, out)
        else:
            trained = adapter_from_model(self.model, self.slot.spec)
            gen = self.train_data.gen
            write_adapter(out, trained, TrainingState(
                trained.tensors, self.opt.state_dict(), {"noise": gen.get_state(), "torch": torch.get_rng_state()},
                step, epoch=epoch, config=dataclasses.asdict(lcfg),
                # the runtime settings (seed, device, precision) beside the training ones, where they always were
                train_config={**dataclasses.asdict(run.tcfg), **dataclasses.asdict(run.rcfg)},
                base_config=pipe.ckpt["config"], data_size=pipe.data_size))
            self.trained, self.step = trained, step
            self.write_card()
        if run.own is not None and self.preview_path not in self.previews_written:
            training_preview_png(self.preview_path, run.own, self.own_set, lcfg.prior_weight)
            self.previews_written.add(self.preview_path)


    def write_card(self):
        """README.md beside the adapter (model_card): what it is and how it was made, the newest preview."""
        if self.trained is None:
            return
        run = self.run
        lcfg = run.lcfg
        write_card(run.args.out, self.trained, CardFacts(
            data=lcfg.style, steps=self.step, max_steps=lcfg.lora_steps, lr=lcfg.lora_lr,
            command=getattr(run.args, "command", None)))


def open_loss_log(run, pipe, model, paths, hooks, global_batch, step, precision):
    """On rank 0: the loss log and (--preview-every) the previews beside the output, hooked in after each logged
    step; returns the LossLog to close, or None on the other ranks."""
    if not run.dist_info.main:
        return None
    args, lcfg, device = run.args, run.lcfg, run.device
    resume_step = step if run.adapter is not None else None
    loss_log = LossLog(paths.csv, global_batch, resume_step=resume_step,
                       tensorboard_dir=paths.tensorboard if args.tensorboard else None)
    previews = None
    if args.preview_every:
        with fork_rng(device):  # building the frozen base's copy draws its init from the run's stream
            base = load_pipeline(args.ckpt, device, args.weights).model
        previews = Previews(base, pipe.diffusion, paths.previews, every=args.preview_every, max_steps=lcfg.lora_steps,
                            device=device, precision=precision, data_size=pipe.data_size, seed=run.rcfg.seed,
                            name="full" if args.full else "adapter", resume_step=resume_step)
        del base

    def after_log(s, loss, lr):
        loss_log.step(s, loss, lr)
        if previews is not None:
            previews.step(model, s, loss)
    hooks.after_log = after_log
    return loss_log


def log_done(run, paths, step, running, start):
    """The loss curve (rank 0) and the closing line: time, loss, where the files went and how large."""
    args, lcfg, main_rank = run.args, run.lcfg, run.dist_info.main
    curve = loss_curve_png(paths.csv, paths.curve, f"lora_finetune.py: style {lcfg.style}, r={lcfg.r}, "
                           f"targets {','.join(lcfg.targets)}, lr {lcfg.lora_lr}") if main_rank else None
    size = adapter_size(args.out) if main_rank else 0
    run.log(f"lora: done, {step} steps in {(time.time() - start) / 60:.1f} min, loss {running:.4f}; "
            f"{'full fine-tune' if args.full else 'adapter'} "
            f"{args.out} ({size / 1024:.0f} KB, base checkpoint {os.path.getsize(args.ckpt) / 2**20:.1f} MB)"
            + (f"; loss log {paths.csv} and {curve}" if curve else ""))


if __name__ == "__main__":
    main()
