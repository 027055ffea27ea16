"""Train the class-conditional diffusion UNet on real digits.

    python train.py                                  # the fast default: a laptop CPU, about 10 minutes
    python train.py --preset tutorial --device cuda  # the tutorial's sizes, for a GPU
    python train.py --resume                         # carry on from out/ckpt.pt, exactly where it stopped
    torchrun --nproc_per_node=2 train.py             # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Writes out/ckpt.pt (model, EMA, optimizer, step, epoch, RNG state and the full config; a plain
dict that loads with weights_only=True) at the end of every epoch (--save-every) and on Ctrl-C,
a sample grid per epoch (--sample-every) under out/samples/, and out/config.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from config import (CLIError, DiffusionConfig, ModelConfig, TrainConfig, UserError, add_config_args,
                    add_preset_arg, atomic_write, config_dict, config_from_args, preset_config, run_main)
from dataset import load_dataset, save_grid, to_model_range, to_uint8
from diffusion import Diffusion
from unet import (CHECKPOINT_VERSION, UNet, count_parameters, load_checkpoint, load_state_strict,
                  save_checkpoint)

# ------------------------------------------------------------ device, precision

def pick_device(name="auto"):
    """auto tries cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16():
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no cheap way to tell, so stay in fp32
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision, device):
    """auto: bf16 on CUDA GPUs that support it and on CPUs with bf16 hardware; fp32 elsewhere."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise CLIError("--precision fp16 is for GPUs; on a CPU use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast(device, precision):
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------ distributed

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def cleanup_distributed(ok=True):
    """Leave the process group, all ranks together.

    After the last step rank 0 still writes the checkpoint and the sample grid while the other
    ranks are done. A rank that tore gloo down and exited in that window was seen to abort
    ("terminate called without an active exception", SIGABRT) and take the run down with it, so
    on success every rank first waits at a barrier for rank 0. The DDP wrapper's reducer holds
    the process group too: collect it now, while the interpreter is whole, not at exit. On the
    error path there is no barrier, since a rank that died would leave the others waiting."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def load_dataset_distributed(name, split, data_dir, dist_info, log=print):
    """load_dataset on every rank, and the same data set on all of them.

    Only rank 0 may download, and only rank 0 turns "auto" into a concrete name, which it sends to
    the others: a rank that resolved "auto" itself could pick mnist-5k while rank 0 downloads full
    MNIST (or find another disk on another machine) and silently train on other data."""
    if dist_info.world == 1:
        return load_dataset(name, split, data_dir, download=True, log=log)
    chosen = [None]
    if dist_info.main:
        data = load_dataset(name, split, data_dir, download=True, log=log)
        chosen = [data.name]
    dist.broadcast_object_list(chosen, src=0)  # the other ranks wait here while rank 0 downloads
    if not dist_info.main:
        data = load_dataset(chosen[0], split, data_dir, download=False, log=log)
    return data


def per_rank_batch(batch_size, scope, world):
    """(per-rank batch, global batch) for ``--batch-scope global|per-rank``."""
    if scope == "per-rank":
        return batch_size, batch_size * world
    if batch_size % world:
        raise CLIError(f"global batch {batch_size} does not split over {world} processes; "
                       f"pass a multiple of {world} or --batch-scope per-rank")
    return batch_size // world, batch_size


def epoch_batches(n, global_batch, epoch, seed, dist_info):
    """The index batches of one epoch for this rank, as torch's DistributedSampler shards them.

    One permutation per (seed, epoch), the same on every rank; global batch k is
    perm[k*B:(k+1)*B] and rank r takes every world-th element of it, so the ranks together see
    exactly the batches a single process would, and each rank a different shard every epoch.
    The last incomplete batch is dropped."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    steps = n // global_batch
    return [perm[k * global_batch:(k + 1) * global_batch][dist_info.rank::dist_info.world] for k in range(steps)]


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps (SGDR, Loshchilov & Hutter 2017)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema, model, decay, num_updates):
    """EMA of the weights, warmed up as in TensorFlow's ExponentialMovingAverage: min(decay, (1+n)/(10+n))."""
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def draw_batch_noise(gen, global_batch, timesteps, label_drop, shape, dist_info):
    """t, noise and the label-drop mask for the whole global batch, then this rank's share.

    Drawn for the global batch on every rank from the same generator, so a run on N processes
    sees the same noise per example as a single process on the same global batch."""
    t = torch.randint(0, timesteps, (global_batch,), generator=gen)
    noise = torch.randn((global_batch, *shape), generator=gen)
    drop = torch.rand(global_batch, generator=gen) < label_drop
    sl = slice(dist_info.rank, None, dist_info.world)
    return t[sl], noise[sl], drop[sl]


@torch.no_grad()
def generate(model, diffusion, labels, device, precision="fp32", sampler="ddim", steps=50, eta=0.0, guidance=2.0,
             seed=0, data_size=None, num_frames=0, progress=None):
    """Sample one image per label; returns (uint8 images (N, H, W), list of uint8 frames).

    A torch.Generator seeded with ``seed`` makes the result the same on every run."""
    g = torch.Generator(device).manual_seed(seed)
    labels = labels.to(device)
    shape = (len(labels), model.cfg.in_channels, model.cfg.img_size, model.cfg.img_size)
    with autocast(device, precision):
        x, frames = diffusion.sample(model, labels, shape, sampler=sampler, steps=steps, eta=eta,
                                     guidance=guidance, generator=g, num_frames=num_frames, progress=progress)
    return to_uint8(x, data_size), [to_uint8(f, data_size) for f in frames]


def make_optimizer(params, lr, weight_decay, device):
    """AdamW over the parameters that require grad; fused (one kernel for all tensors) on CPU and CUDA."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def get_batch(x_all, y_all, idx, gen, global_batch, timesteps, label_drop, null_label, dist_info, device):
    """This rank's training batch: images and labels by index, then t, noise, and labels dropped to null."""
    idx = idx.to(device)
    x0, labels = x_all[idx], y_all[idx]
    t, noise, drop = draw_batch_noise(gen, global_batch, timesteps, label_drop, x0.shape[1:], dist_info)
    t, noise, drop = t.to(device), noise.to(device), drop.to(device)
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    return x0, labels, t, noise


def optimizer_step(fwd_model, params, opt, scaler, diffusion, batch, device, precision, grad_clip):
    """Forward in mixed precision, backward, clip, step; returns the loss (a tensor, not synced)."""
    x0, labels, t, noise = batch
    with autocast(device, precision):
        loss = diffusion.loss(fwd_model, x0, labels, t, noise)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the weights are lost, so nothing more is saved."""
    exit_code = 1


def fit(fwd_model, params, opt, diffusion, x_all, y_all, gen, step, max_steps, global_batch, seed, dist_info,
        device, precision, lr_fn, label_drop, null_label, grad_clip, on_epoch_end, on_interrupt, after_step=None,
        desc="train", resume_hint="", lr_flag="--lr"):
    """The training loop shared by train.py and lora_finetune.py; returns (step, running loss).

    Runs from ``step`` to ``max_steps`` over epochs of ``epoch_batches``; calls
    ``on_epoch_end(epoch, step, last)`` after each epoch (epochs count from 1) and at the end, and
    ``on_interrupt(epoch, step)`` on Ctrl-C before exiting with 130, so nothing learned is lost.
    A loss that is not finite raises TrainingDiverged before the next save, so the last good
    checkpoint is never overwritten by NaN weights (the loss is all-reduced: every rank stops).
    """
    params = [p for p in params if p.requires_grad]
    n = len(y_all)
    steps_per_epoch = n // global_batch
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    bar = None
    if dist_info.main:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=step, desc=desc, dynamic_ncols=True, mininterval=1.0)
    running = float("nan")
    fwd_model.train()
    try:
        while step < max_steps:
            epoch, first = divmod(step, steps_per_epoch)
            for idx in epoch_batches(n, global_batch, epoch, seed, dist_info)[first:]:
                batch = get_batch(x_all, y_all, idx, gen, global_batch, diffusion.timesteps, label_drop, null_label,
                                  dist_info, device)
                for group in opt.param_groups:
                    group["lr"] = lr_fn(step)
                loss = optimizer_step(fwd_model, params, opt, scaler, diffusion, batch, device, precision, grad_clip)
                if after_step is not None:
                    after_step(step)
                step += 1
                lv = loss.detach()
                if dist_info.world > 1:  # log the global batch's loss, as one process would, not rank 0's share
                    dist.all_reduce(lv)  # SUM: gloo has no AVG
                    lv = lv / dist_info.world
                lv = lv.item()
                if not math.isfinite(lv):
                    if bar is not None:
                        bar.close()
                    raise TrainingDiverged(
                        f"{desc}: the loss became {lv} at step {step} (lr {lr_fn(step - 1):.2e}): training "
                        f"diverged. Nothing was saved after the last checkpoint, if any. Lower {lr_flag} or keep "
                        f"--grad-clip on, then start again or continue from that checkpoint with: {resume_hint}")
                running = lv if running != running else 0.98 * running + 0.02 * lv
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr_fn(step - 1):.2e}", epoch=epoch + 1)
                if step >= max_steps:
                    break
            last = step >= max_steps
            if step % steps_per_epoch == 0 or last:
                on_epoch_end(step // steps_per_epoch, step, last)
    except KeyboardInterrupt:
        on_interrupt(step // steps_per_epoch, step)
        if bar is not None:
            bar.close()
        if dist_info.main:  # only rank 0 saved, so only rank 0 says so
            print(f"\ninterrupted at step {step}; saved; continue with: {resume_hint}", file=sys.stderr)
        sys.exit(130)
    if bar is not None:
        bar.close()
    return step, running


# ------------------------------------------------------------------------ main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_preset_arg(p)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default OUT_DIR/ckpt.pt) at its saved step")
    add_config_args(p, ModelConfig)
    add_config_args(p, DiffusionConfig)
    add_config_args(p, TrainConfig)
    return p.parse_args(argv)


def check_resume_flags(args, ckpt, path):
    """On --resume the model and schedule come from the checkpoint; a flag that contradicts them is an error."""
    for cls, key in ((ModelConfig, "model"), (DiffusionConfig, "diffusion")):
        for f in dataclasses.fields(cls):
            given = getattr(args, f.name, None)
            saved = ckpt["config"][key][f.name]
            if given is not None and type(saved)(given) != saved:
                raise CLIError(f"--{f.name.replace('_', '-')} {given} contradicts {path!r}, which was trained "
                               f"with {saved}; drop the flag to resume, or start afresh in another --out-dir")


def main(argv=None):
    return run_main(train, parse_args(argv), cleanup_distributed)


def train(args):
    resume_path = None
    ckpt = None
    if args.resume is not None:
        out_dir = args.out_dir or preset_config(TrainConfig, args.preset).out_dir
        resume_path = args.resume or os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(resume_path)
        check_resume_flags(args, ckpt, resume_path)
        saved = ckpt["config"]
        # the run's own settings, not the preset's; training flags given now (say --max-steps) still win
        tcfg = config_from_args(args, TrainConfig, saved=saved["train"])
        mcfg = ModelConfig(**saved["model"])
        dcfg = DiffusionConfig(**saved["diffusion"])
    else:
        tcfg = config_from_args(args, TrainConfig, args.preset)
        mcfg = config_from_args(args, ModelConfig, args.preset)
        dcfg = config_from_args(args, DiffusionConfig, args.preset)

    dist_info, device = setup_distributed(tcfg.device)
    precision = resolve_precision(tcfg.precision, device)
    log = print if dist_info.main else (lambda *a, **k: None)
    local_batch, global_batch = per_rank_batch(tcfg.batch_size, tcfg.batch_scope, dist_info.world)

    torch.manual_seed(tcfg.seed)
    data = load_dataset_distributed(tcfg.dataset, "train", tcfg.data_dir, dist_info, log)
    if mcfg.num_classes != len(data.classes):
        raise CLIError(f"--num-classes {mcfg.num_classes} but {data.name} has {len(data.classes)} classes")
    if global_batch > len(data):
        raise CLIError(f"batch {global_batch} is larger than the {len(data)} training images; lower --batch-size")
    data_size = data.images.shape[-1]
    x_all = to_model_range(data.images, mcfg.img_size).to(device)  # the whole set, in memory: no data wait
    y_all = data.labels.to(device)
    steps_per_epoch = len(data) // global_batch

    model = UNet(mcfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = Diffusion.from_config(dcfg).to(device)
    opt = make_optimizer(model.parameters(), tcfg.lr, tcfg.weight_decay, device)
    gen = torch.Generator().manual_seed(tcfg.seed + 1)  # noise, timesteps and label drop
    step, prior_seconds = 0, 0.0
    if ckpt is not None:
        load_state_strict(model, ckpt["model"], f"{resume_path!r} [model]")
        load_state_strict(ema, ckpt["ema"], f"{resume_path!r} [ema]")
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"]["noise"])
        step = ckpt["step"]
        prior_seconds = ckpt.get("train_seconds", 0.0)
    fwd_model = model
    if dist_info.world > 1:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile:
        fwd_model = torch.compile(fwd_model)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and later: fp32 range, 10-bit mantissa
        torch.backends.cudnn.allow_tf32 = True

    out_dir = tcfg.out_dir
    cfg_all = config_dict(mcfg, dcfg, tcfg)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if dist_info.main:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        atomic_write(os.path.join(out_dir, "config.json"),
                     lambda tmp: open(tmp, "w").write(json.dumps(cfg_all, indent=2)))
    log(f"train: {data.name} ({len(data)} images, {data_size}x{data_size} -> {mcfg.img_size}), device {device}, "
        f"{precision}, {count_parameters(model) / 1e6:.2f}M parameters, preset {args.preset}")
    log(f"train: {dist_info.world} process(es) x batch {local_batch} = global batch {global_batch}, "
        f"lr {tcfg.lr} (not scaled with the batch), steps {step}->{tcfg.max_steps}, "
        f"{steps_per_epoch} steps per epoch")

    def save(epoch, step):
        if not dist_info.main:
            return
        save_checkpoint({
            "version": CHECKPOINT_VERSION, "kind": "base",
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "epoch": epoch, "rng": {"noise": gen.get_state()},
            "config": cfg_all, "dataset": data.name, "data_size": data_size,
            "train_seconds": prior_seconds + time.time() - start,  # wall time of training, across resumes
        }, ckpt_path)
        if tcfg.snapshot_every and epoch % tcfg.snapshot_every == 0:
            shutil.copyfile(ckpt_path, os.path.join(out_dir, f"ckpt_step{step:06d}.pt"))

    grid_labels = torch.arange(mcfg.num_classes)
    start = time.time()

    def on_epoch_end(epoch, step, last):
        if last or epoch % tcfg.save_every == 0:
            save(epoch, step)
        if dist_info.main and (last or (tcfg.sample_every and epoch % tcfg.sample_every == 0)):
            ema.eval()
            grid, _ = generate(ema, diffusion, grid_labels.repeat(4 if last else 1), device, precision,
                               steps=min(20, dcfg.timesteps), seed=tcfg.seed, data_size=data_size)
            name = "final.png" if last else f"epoch_{epoch:04d}.png"
            save_grid(grid, os.path.join(out_dir, "samples", name), nrow=mcfg.num_classes)

    step, running = fit(fwd_model, model.parameters(), opt, diffusion, x_all, y_all, gen, step, tcfg.max_steps,
                        global_batch, tcfg.seed, dist_info, device, precision, lambda s: lr_at(s, tcfg),
                        tcfg.label_drop, mcfg.num_classes, tcfg.grad_clip, on_epoch_end, on_interrupt=lambda e, s: save(e, s),
                        after_step=lambda s: ema_update(ema, model, tcfg.ema_decay, s), desc="train",
                        resume_hint="python train.py --resume")
    log(f"train: done, {step} steps in {(time.time() - start) / 60:.1f} min, final loss {running:.4f}; "
        f"checkpoint {ckpt_path}, samples in {os.path.join(out_dir, 'samples')}")
    return ckpt_path


if __name__ == "__main__":
    main()
