"""Train the class-conditional diffusion UNet on real digits.

    python train.py                                  # the fast default: a laptop CPU
    python train.py --preset tutorial --device cuda  # the tutorial's sizes, for a GPU
    python train.py --resume                         # carry on from out/ckpt.pt, exactly where it stopped
    python train.py --time-budget 8                  # as many steps as fit in 8 minutes here (timed first)
    python train.py --out-dir out --overwrite        # start afresh where a checkpoint already is, replacing it
    torchrun --nproc_per_node=2 train.py             # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Writes out/ckpt.pt (model, EMA, optimizer, step, epoch, RNG state and the full config; a plain
dict that loads with weights_only=True) at the end of every epoch (--save-every) and on Ctrl-C,
a sample grid per epoch (--sample-every) under out/samples/, and out/config.json with the first
checkpoint (a run that fails before it leaves an earlier run's config.json as it was). The loss goes
to out/loss.csv as it trains (step, loss, lr, images/s; a resumed run continues it), drawn as
out/loss_curve.png at the end; --tensorboard also writes TensorBoard events to out/tensorboard/.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shlex
import shutil
import time

import torch

from checkpoint import CHECKPOINT_VERSION, load_checkpoint, load_state_strict, save_checkpoint
from files import (atomic_write, check_apart, check_not_in_use, check_replace, check_writable_dir, lock_output,
                   remove_stale_temps, same_file, write_json)
from config import (CKPT_NAME, DiffusionConfig, ModelConfig, SampleConfig, TrainConfig, config_dict, from_saved,
                    preset_config, saved_runtime, saved_value)
from cli import (ArgumentParser, add_config_args, add_config_file_arg, add_preset_arg, add_runtime_args,
                 config_file_note, config_from_args, runtime_from_args)
from errors import CLIError, run_main
from dataset import to_model_range
from logs import LOSS_CSV, LOSS_CURVE, TENSORBOARD_DIR, TENSORBOARD_HINT, LossLog, loss_curve_png, require_tensorboard
from diffusion import Diffusion, generate
from pictures import save_grid
from runtime import (broadcast_object, check_precision, enable_tf32, end_run, per_rank_batch,
                     rank0_logger, resolve_precision, setup_distributed, wrap_ddp)
from trainer import (FitSettings, Hooks, TrainData, ema_update, fit, load_dataset_distributed, lr_at, make_optimizer,
                     precision_probe, steps_for_budget)
from unet import UNet, count_parameters


# ------------------------------------------------------------------------ main

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_preset_arg(p)
    add_config_file_arg(p)
    training, out = p.group("training"), p.group("output")
    # no path_arg: argparse passes the bare flag's "" through the type too, and "" means OUT_DIR/ckpt.pt here
    training.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                          help="continue from CKPT (default OUT_DIR/ckpt.pt) at its saved step")
    out.add_argument("--overwrite", action="store_true",
                     help="start afresh even though OUT_DIR already holds a checkpoint, replacing it")
    out.add_argument("--tensorboard", action="store_true",
                     help=f"also write TensorBoard events to OUT_DIR/{TENSORBOARD_DIR} (needs: {TENSORBOARD_HINT})")
    add_config_args(p, ModelConfig)
    add_config_args(p, DiffusionConfig)
    add_config_args(p, TrainConfig)
    add_runtime_args(p)
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def check_flags_match_checkpoint(args, ckpt, path):
    """On --resume the model and schedule come from the checkpoint; a flag that contradicts them is an error."""
    for cls, key in ((ModelConfig, "model"), (DiffusionConfig, "diffusion")):
        for f in dataclasses.fields(cls):
            given = getattr(args, f.name, None)
            saved = saved_value(cls, ckpt["config"][key], f.name)  # a field added later: what older runs used
            if given is not None and type(saved)(given) != saved:
                raise CLIError(f"--{f.name.replace('_', '-')} {given} contradicts {path!r}, which was trained "
                               f"with {saved}; drop the flag to resume, or start afresh in another --out-dir")


def main(argv=None):
    return run_main(train, parse_args(argv), end_run)


def train(args):
    """Parse the settings, build the model, data and optimizer, run the loop, save; returns the checkpoint path."""
    if args.tensorboard:
        require_tensorboard()
    tcfg, mcfg, dcfg, rcfg, ckpt, resume_path = resolve_configs(args)
    check_outputs(tcfg.out_dir, resume_path, args.overwrite, args.config)
    dist_info, device = setup_distributed(rcfg.device)
    check_precision(rcfg.precision, device)
    enable_tf32(device)
    log = rank0_logger(dist_info)
    if config_file_note(args):
        log(f"train: {config_file_note(args)}")
    local_batch, global_batch = per_rank_batch(tcfg.batch_size, tcfg.batch_scope, dist_info.world)
    torch.manual_seed(rcfg.seed)
    data, diffusion, train_data = load_train_data(tcfg, mcfg, dcfg, rcfg, dist_info, device, log, global_batch)
    model, ema, opt, step, prior_seconds = build_model(mcfg, tcfg, device, train_data, ckpt, resume_path)
    # decided once, as in every script: auto on CUDA times this model's step in both precisions, rank 0 decides
    probe = precision_probe(model, diffusion, train_data, dcfg.timesteps, local_batch, device)
    precision = resolve_precision(rcfg.precision, device, probe, log, dist_info)
    if tcfg.time_budget and ckpt is None:
        tcfg = size_to_budget(tcfg, model, diffusion, train_data, batch_size=local_batch, device=device,
                              precision=precision, dist_info=dist_info, log=log)
    fwd_model = wrap_ddp(model, dist_info, device)
    if tcfg.compile:
        fwd_model = torch.compile(fwd_model)

    out_dir = tcfg.out_dir
    ckpt_path = os.path.join(out_dir, CKPT_NAME)
    resume_hint = f"python train.py --resume {shlex.quote(ckpt_path)} --out-dir {shlex.quote(out_dir)}"
    log(f"train: {data.name} ({len(data)} images, {data.images.shape[-1]}x{data.images.shape[-1]} -> "
        f"{mcfg.img_size}), device {device}, {precision}, {count_parameters(model) / 1e6:.2f}M parameters, "
        f"preset {args.preset}")
    log(f"train: {dist_info.world} process(es) x batch {local_batch} = global batch {global_batch}, "
        f"lr {tcfg.lr} (not scaled with the batch), steps {step}->{tcfg.max_steps}, "
        f"{train_data.steps_per_epoch} steps per epoch")

    start = time.time()
    saver = TrainSaver(model=model, ema=ema, opt=opt, train_data=train_data, diffusion=diffusion, data=data,
                       configs=(mcfg, dcfg, tcfg, rcfg), dist_info=dist_info, device=device, precision=precision,
                       ckpt_path=ckpt_path, prior_seconds=prior_seconds, start=start)
    settings = FitSettings(max_steps=tcfg.max_steps, lr_fn=lambda s: lr_at(s, tcfg), grad_clip=tcfg.grad_clip,
                           device=device, precision=precision, desc="train", resume_hint=resume_hint, lr_flag="--lr",
                           checkpoint=ckpt_path)
    hooks = Hooks(on_epoch_end=saver.on_epoch_end, on_interrupt=saver.save,
                  after_step=lambda s: ema_update(ema, model, tcfg.ema_decay, s))
    # the loss log: a row per step, flushed as it goes; a resumed run drops the rows after its checkpoint's step
    loss_log = LossLog(os.path.join(out_dir, LOSS_CSV), global_batch, resume_step=step if ckpt is not None else None,
                       tensorboard_dir=os.path.join(out_dir, TENSORBOARD_DIR) if args.tensorboard else None
                       ) if dist_info.main else None
    if loss_log is not None:
        hooks.after_log = lambda s, loss, lr: loss_log.step(s, loss, lr)
    try:
        step, running = fit(fwd_model, opt, diffusion, train_data, settings, step, hooks)
    finally:
        if loss_log is not None:
            loss_log.close()
    curve = loss_curve_png(os.path.join(out_dir, LOSS_CSV), os.path.join(out_dir, LOSS_CURVE),
                           f"train.py: {data.name}, preset {args.preset}, batch {global_batch}, lr {tcfg.lr}"
                           ) if dist_info.main else None
    log(f"train: done, {step} steps in {(time.time() - start) / 60:.1f} min, final loss {running:.4f}; "
        f"checkpoint {ckpt_path}, samples in {os.path.join(out_dir, 'samples')}, loss log "
        f"{os.path.join(out_dir, LOSS_CSV)}" + (f" and {curve}" if curve else ""))
    return ckpt_path


def load_train_data(tcfg, mcfg, dcfg, rcfg, dist_info, device, log, global_batch):
    """The whole data set in memory, on the device (no data wait), checked against the model's settings; then,
    the inputs being good, the lock on the folder. Returns (data, the diffusion schedule, TrainData)."""
    data = load_dataset_distributed(tcfg.dataset, "train", tcfg.data_dir, dist_info, log)
    if mcfg.num_classes != len(data.classes):
        raise CLIError(f"--num-classes {mcfg.num_classes} but {data.name} has {len(data.classes)} classes")
    if global_batch > len(data):
        raise CLIError(f"batch {global_batch} is larger than the {len(data)} training images; lower --batch-size")
    if dist_info.main:  # the inputs are good: one run at a time in the folder, then what a killed one left there
        lock_output(tcfg.out_dir, "--out-dir", log=log)
        for folder in (tcfg.out_dir, os.path.join(tcfg.out_dir, "samples")):
            remove_stale_temps(folder, log)
    diffusion = Diffusion.from_config(dcfg).to(device)
    train_data = TrainData(images=to_model_range(data.images, mcfg.img_size).to(device),
                           labels=data.labels.to(device), global_batch=global_batch, seed=rcfg.seed,
                           label_drop=tcfg.label_drop, null_label=mcfg.num_classes, dist=dist_info,
                           gen=torch.Generator().manual_seed(rcfg.seed + 1),  # noise, timesteps, label drop
                           draw_t=diffusion.draw_t)
    return data, diffusion, train_data


def build_model(mcfg, tcfg, device, train_data, ckpt, resume_path):
    """The model, its EMA and the optimizer, with their saved state on --resume (and the random streams where
    the run left them). Returns (model, ema, opt, step, the seconds trained before)."""
    model = UNet(mcfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model.parameters(), tcfg.lr, tcfg.weight_decay, device)
    if ckpt is None:
        return model, ema, opt, 0, 0.0
    load_state_strict(model, ckpt["model"], f"{resume_path!r} [model]")
    load_state_strict(ema, ckpt["ema"], f"{resume_path!r} [ema]")
    opt.load_state_dict(ckpt["optimizer"])
    train_data.gen.set_state(ckpt["rng"]["noise"])
    if "torch" in ckpt["rng"]:  # the global generator (dropout), saved since the step-boundary Ctrl-C
        torch.set_rng_state(ckpt["rng"]["torch"])
    return model, ema, opt, ckpt["step"], ckpt.get("train_seconds", 0.0)


@dataclasses.dataclass
class TrainSaver:
    """The checkpoint (every --save-every epochs, at the end, on Ctrl-C), config.json with the first one, the
    --snapshot-every copies, and the sample grids; rank 0 alone writes."""
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    train_data: TrainData
    diffusion: Diffusion
    data: object  # dataset.Digits: its name and image size go into the checkpoint
    configs: tuple  # (model, diffusion, train, runtime)
    dist_info: object
    device: torch.device
    precision: str
    ckpt_path: str
    prior_seconds: float  # wall time of training before a --resume
    start: float
    config_written: bool = False  # config.json goes with the first checkpoint: a run failing before it rewrites none

    def save(self, epoch, step):
        if not self.dist_info.main:
            return
        tcfg = self.configs[2]
        out_dir, cfg_all = tcfg.out_dir, config_dict(*self.configs)
        save_checkpoint({
            "version": CHECKPOINT_VERSION, "kind": "base",
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "step": step, "epoch": epoch,
            "rng": {"noise": self.train_data.gen.get_state(), "torch": torch.get_rng_state()},
            "config": cfg_all, "dataset": self.data.name, "data_size": self.data.images.shape[-1],
            "train_seconds": self.prior_seconds + time.time() - self.start,  # wall time of training, across resumes
        }, self.ckpt_path)
        if not self.config_written:
            write_json(os.path.join(out_dir, "config.json"), cfg_all)
            self.config_written = True
        if tcfg.snapshot_every and epoch % tcfg.snapshot_every == 0:
            atomic_write(os.path.join(out_dir, f"ckpt_step{step:06d}.pt"),
                         lambda tmp: shutil.copyfile(self.ckpt_path, tmp))

    def on_epoch_end(self, epoch, step, last):
        mcfg, dcfg, tcfg, rcfg = self.configs
        if last or epoch % tcfg.save_every == 0:
            self.save(epoch, step)
        if self.dist_info.main and (last or (tcfg.sample_every and epoch % tcfg.sample_every == 0)):
            name = "final.png" if last else f"epoch_{epoch:04d}.png"
            save_progress_grid(self.ema, self.diffusion, mcfg.num_classes, self.device, self.precision, rcfg.seed,
                               self.data.images.shape[-1], os.path.join(tcfg.out_dir, "samples", name),
                               rows=4 if last else 1, steps=min(20, dcfg.timesteps))


def size_to_budget(tcfg, model, diffusion, data, *, batch_size, device, precision, dist_info, log):
    """``tcfg`` with ``max_steps`` = the steps that fit in ``--time-budget`` minutes at a step timed now.

    Rank 0's count is the one every rank uses. The count goes into the checkpoint's config like any
    --max-steps, so ``--resume`` carries on with it and ``--max-steps N`` repeats the run exactly."""
    steps, seconds = steps_for_budget(tcfg.time_budget, model, diffusion, data, batch_size=batch_size, device=device,
                                      precision=precision, grad_clip=tcfg.grad_clip)
    steps = broadcast_object(steps, dist_info)
    if steps < 1:
        raise CLIError(f"--time-budget {tcfg.time_budget:g} minutes fits no training step: one takes {seconds:.2f} s "
                       "here; give more minutes, or --max-steps")
    log(f"train: --time-budget {tcfg.time_budget:g} min at {seconds:.3f} s per step (median of 3, timed just now) "
        f"-> {steps} steps; --max-steps {steps} repeats this run exactly")
    return dataclasses.replace(tcfg, max_steps=steps)


def check_outputs(out_dir, resume_path, overwrite, config=None):
    """Before any work: the folder can be written and no other run writes there, no file it writes is the
    checkpoint it resumes (other than ckpt.pt itself, which a resumed run continues) or the --config it read,
    none holds a file of another kind, and a fresh run does not replace another run's checkpoint."""
    check_writable_dir(out_dir, "--out-dir")
    check_not_in_use(out_dir, "--out-dir")
    existing = os.path.join(out_dir, CKPT_NAME)
    samples = os.path.join(out_dir, "samples")
    in_place = resume_path is not None and same_file(resume_path, existing)
    outputs = [("--out-dir", os.path.join(out_dir, name))
               for name in ("config.json", "samples", LOSS_CSV, LOSS_CURVE, TENSORBOARD_DIR)]
    check_apart(outputs + ([] if in_place else [("--out-dir", existing)]), [("--resume", resume_path)],
                "resume it from another --out-dir, or copy it elsewhere first")
    check_apart(outputs + [("--out-dir", existing)], [("--config", config)], "pass another --out-dir, or move the "
                "file out of it first")
    check_replace(existing, "--out-dir", ("checkpoint",), None, "a checkpoint")
    check_replace(os.path.join(out_dir, "config.json"), "--out-dir", ("json",), None, "a run's config.json")
    if os.path.isdir(samples):
        for name in sorted(os.listdir(samples)):
            if name == "final.png" or name.startswith("epoch_") and name.endswith(".png"):
                check_replace(os.path.join(samples, name), "--out-dir", ("png",), None, "a sample grid")
    if overwrite or not os.path.exists(existing) or in_place:
        return
    if resume_path is None:
        raise CLIError(f"{existing!r} already exists: continue that run with python train.py --resume "
                       f"{shlex.quote(existing)} --out-dir {shlex.quote(out_dir)}, start afresh in another "
                       "--out-dir, or pass --overwrite to replace it")
    raise CLIError(f"--out-dir {out_dir!r} already holds another run's checkpoint ({existing!r}); continue "
                   f"{resume_path!r} in another --out-dir, or pass --overwrite to replace it")


def resolve_configs(args):
    """The run's configs: from the preset and flags, or on --resume from the checkpoint (flags still win).

    Returns (train, model, diffusion, runtime configs, the checkpoint or None, its path or None). A checkpoint
    saved before RuntimeConfig existed holds device, precision and seed in its train settings."""
    if args.time_budget:
        if args.resume is not None:
            raise CLIError("--time-budget sizes a new run; a resumed run keeps the steps it was given "
                           "(pass --max-steps to change them)")
        if args.max_steps is not None:
            raise CLIError("--time-budget and --max-steps both set the number of steps: give one of them")
    if args.resume is None:
        tcfg = config_from_args(args, TrainConfig, args.preset)
        if args.time_budget is None and {"time_budget", "max_steps"} <= set(getattr(args, "_from_file", {})
                                                                             .get("train", {})):
            # a written config.json: its max_steps are the steps its budget chose, so the run repeats exactly
            tcfg = dataclasses.replace(tcfg, time_budget=0.0)
        return (tcfg, config_from_args(args, ModelConfig, args.preset),
                config_from_args(args, DiffusionConfig, args.preset), runtime_from_args(args), None, None)
    if args.config:
        raise CLIError("--resume carries on with the checkpoint's own settings; --config starts a new run "
                       "from a file's: give one of them")
    out_dir = args.out_dir or preset_config(TrainConfig, args.preset).out_dir
    resume_path = args.resume or os.path.join(out_dir, CKPT_NAME)
    ckpt = load_checkpoint(resume_path)
    if not (isinstance(ckpt["config"].get("train"), dict) and isinstance(ckpt.get("optimizer"), dict)
            and isinstance(ckpt.get("rng"), dict) and isinstance(ckpt["rng"].get("noise"), torch.Tensor)):
        raise CLIError(f"{resume_path!r} lacks the training state --resume needs (optimizer, RNG, settings); "
                       "it can be sampled from, not continued")
    check_flags_match_checkpoint(args, ckpt, resume_path)
    saved = ckpt["config"]
    # the run's own settings, not the preset's; training flags given now (say --max-steps) still win
    return (config_from_args(args, TrainConfig, saved=saved["train"]), from_saved(ModelConfig, saved["model"]),
            from_saved(DiffusionConfig, saved["diffusion"]),
            runtime_from_args(args, saved=saved_runtime(saved.get("runtime"), saved["train"])), ckpt, resume_path)


def save_progress_grid(ema, diffusion, num_classes, device, precision, seed, data_size, path, *, rows, steps):
    """A grid of EMA samples, one column per label, ``rows`` rows: the run's progress at a glance."""
    ema.eval()
    labels = torch.arange(num_classes).repeat(rows)
    grid, _ = generate(ema, diffusion, labels, device, precision, SampleConfig(steps=steps), seed=seed,
                       data_size=data_size)
    save_grid(grid, path, nrow=num_classes)


if __name__ == "__main__":
    main()
