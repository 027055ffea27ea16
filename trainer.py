"""The training loop that train.py and lora_finetune.py share: data order, noise, one optimizer step, EMA.

    data = TrainData(images=..., labels=..., global_batch=..., seed=..., label_drop=..., null_label=...,
                     dist=..., gen=...)
    settings = FitSettings(max_steps=..., lr_fn=..., grad_clip=..., device=..., precision=..., desc="train", ...)
    step, loss = fit(fwd_model, opt, diffusion, data, settings, step, Hooks(on_epoch_end, on_interrupt, after_step))

One optimizer step lives in one place, ``make_train_step``: fit calls it, bench.py times it.

Ctrl-C (SIGINT) never cuts a step in half: it sets a flag, the step in progress finishes, and the
loop stops at the boundary, saves through ``on_interrupt`` and exits with 130. The state saved
there (weights, EMA, optimizer, RNG, step) is exactly the state an uninterrupted run has at that
step, so ``--resume`` continues it tensor for tensor. A second Ctrl-C stops at once, saving
nothing; the last checkpoint written (always at a step boundary, atomically) is then the one to
resume from.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import statistics
import sys
import threading
from typing import Callable, Optional

import torch

from errors import UserError
from dataset import load_dataset
from runtime import Dist, all_reduce_mean, autocast, broadcast_object, wall_time

# the LoRA warm-up: a tenth of the fine-tune, at most this many steps (enough for AdamW's moments to settle)
LORA_WARMUP_MAX_STEPS = 50
LORA_GRAD_CLIP = 1.0  # max gradient norm of the LoRA tensors, as for the base model


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the weights are lost, so nothing more is saved."""
    exit_code = 1


# ------------------------------------------------------------------------ data

def load_dataset_distributed(name, split, data_dir, dist_info, log=print):
    """load_dataset on every rank, and the same data set on all of them.

    Only rank 0 may download, and only rank 0 turns "auto" into a concrete name, which it sends to
    the others: a rank that resolved "auto" itself could pick mnist-5k while rank 0 downloads full
    MNIST (or find another disk on another machine) and silently train on other data."""
    if dist_info.world == 1:
        return load_dataset(name, split, data_dir, download=True, log=log)
    data = load_dataset(name, split, data_dir, download=True, log=log) if dist_info.main else None
    chosen = broadcast_object(data.name if dist_info.main else None, dist_info)  # others wait for the download
    if not dist_info.main:
        data = load_dataset(chosen, split, data_dir, download=False, log=log)
    return data


def epoch_batches(n, global_batch, epoch, seed, dist_info):
    """The index batches of one epoch for this rank, as torch's DistributedSampler shards them.

    One permutation per (seed, epoch), the same on every rank; global batch k is
    perm[k*B:(k+1)*B] and rank r takes every world-th element of it, so the ranks together see
    exactly the batches a single process would, and each rank a different shard every epoch.
    The last incomplete batch is dropped."""
    g = torch.Generator().manual_seed((seed * 100003 + epoch) % 2 ** 64)  # a 64-bit seed for any --seed
    perm = torch.randperm(n, generator=g)
    steps = n // global_batch
    return [perm[k * global_batch:(k + 1) * global_batch][dist_info.rank::dist_info.world] for k in range(steps)]


def draw_batch_noise(gen, global_batch, timesteps, label_drop, shape, dist_info, t_range=None, draw_t=None):
    """t, noise and the label-drop mask for the whole global batch, then this rank's share.

    t is in the steps ``t_range`` = (lo, hi), lo <= t < hi (default all of 0..timesteps-1): uniform, or
    ``draw_t(n, gen, lo, hi)`` (Diffusion.draw_t: the base's noise-level distribution).
    Drawn for the global batch on every rank from the same generator, so a run on N processes
    sees the same noise per example as a single process on the same global batch."""
    lo, hi = t_range or (0, timesteps)
    t = draw_t(global_batch, gen, lo, hi) if draw_t else torch.randint(lo, hi, (global_batch,), generator=gen)
    noise = torch.randn((global_batch, *shape), generator=gen)
    drop = torch.rand(global_batch, generator=gen) < label_drop
    sl = slice(dist_info.rank, None, dist_info.world)
    return t[sl], noise[sl], drop[sl]


@dataclasses.dataclass(kw_only=True)
class TrainData:
    """The data side of a run: what is drawn from, how, and by which rank."""
    images: torch.Tensor  # (N, C, S, S) in [-1, 1], on the training device
    labels: torch.Tensor  # (N,) int64, on the training device
    global_batch: int  # images per optimizer step over all ranks
    seed: int  # data order: one permutation per (seed, epoch)
    label_drop: float  # share of labels replaced by the null label (classifier-free guidance)
    null_label: int  # the label index meaning "no label"
    dist: Dist  # this rank and the world size
    gen: torch.Generator  # timesteps, noise and label drop; its state is saved for --resume
    t_range: Optional[tuple] = None  # (lo, hi): draw t from lo..hi-1; None: every step of the schedule
    draw_t: Optional[Callable] = None  # (n, gen, lo, hi) -> t; None: uniform (the fine-tune's t range)

    @property
    def steps_per_epoch(self):
        return len(self.labels) // self.global_batch

    def batch(self, idx, timesteps, device):
        """This rank's training batch: images and labels by index, then t, noise, and labels dropped to null."""
        idx = idx.to(device)
        x0, labels = self.images[idx], self.labels[idx]
        t, noise, drop = draw_batch_noise(self.gen, self.global_batch, timesteps, self.label_drop, x0.shape[1:],
                                          self.dist, self.t_range, self.draw_t)
        t, noise, drop = t.to(device), noise.to(device), drop.to(device)
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return x0, labels, t, noise


# ------------------------------------------------------------ schedule, steps

def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps (SGDR, Loshchilov & Hutter 2017)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lora_lr_at(step, lcfg):
    """The fine-tune's schedule: linear warm-up over a tenth of the steps (at most LORA_WARMUP_MAX_STEPS), then constant."""
    warmup = max(1, min(LORA_WARMUP_MAX_STEPS, lcfg.lora_steps // 10))
    return lcfg.lora_lr * min(1.0, (step + 1) / warmup)


@torch.no_grad()
def ema_update(ema, model, decay, num_updates):
    """EMA of the weights, warmed up as in TensorFlow's ExponentialMovingAverage: min(decay, (1+n)/(10+n))."""
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def make_optimizer(params, lr, weight_decay, device):
    """AdamW over the parameters that require grad; fused (one kernel for all tensors) on CPU and CUDA."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def optimizer_params(opt):
    """The parameters an optimizer updates, in its own order."""
    return [p for group in opt.param_groups for p in group["params"]]


def optimizer_step(fwd_model, opt, scaler, diffusion, batch, device, precision, grad_clip):
    """Forward in mixed precision, backward, clip, step; returns the loss (a tensor, not synced)."""
    x0, labels, t, noise = batch
    with autocast(device, precision):
        loss = diffusion.loss(fwd_model, x0, labels, t, noise)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(optimizer_params(opt), grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss


def make_train_step(fwd_model, opt, diffusion, *, lr_fn, grad_clip, device, precision, after_step=None):
    """The training step: ``train_step(batch, step) -> loss`` (a tensor, not synced).

    It sets the learning rate ``lr_fn(step)``, runs ``optimizer_step`` (with a GradScaler of its
    own, active in fp16 only) and then ``after_step(step)`` (the EMA update). ``fit`` calls it once
    per batch; bench.py times the same function, so what it measures is what training runs."""
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))

    def train_step(batch, step):
        for group in opt.param_groups:
            group["lr"] = lr_fn(step)
        loss = optimizer_step(fwd_model, opt, scaler, diffusion, batch, device, precision, grad_clip)
        if after_step is not None:
            after_step(step)
        return loss
    return train_step


def probe_batch(data, timesteps, batch_size, device):
    """``data``'s first ``batch_size`` images and labels with t and noise from a generator of their own, so
    that timing a step (precision_probe, steps_for_budget) leaves the run's random streams alone."""
    g = torch.Generator().manual_seed(0)
    x0, labels = data.images[:batch_size], data.labels[:batch_size]
    t = torch.randint(0, timesteps, (len(labels),), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    return x0, labels, t, noise


def precision_probe(model, diffusion, data, timesteps, batch_size, device):
    """``probe(precision)`` for runtime.resolve_precision: one forward and backward of the loss on
    ``data``'s first ``batch_size`` images, the gradients dropped. Its t and noise come from its own
    generator, so the run's data, noise and weights are the same whichever precision it picks."""
    x0, labels, t, noise = probe_batch(data, timesteps, batch_size, device)

    def probe(precision):
        with autocast(device, precision):
            loss = diffusion.loss(model, x0, labels, t, noise)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return probe


def steps_for_budget(minutes, model, diffusion, data, *, batch_size, device, precision, grad_clip=0.0, warmup=1,
                     repeats=3, timer=None):
    """How many optimizer steps fit in ``minutes``: (steps, seconds per step).

    A step is timed on a copy of ``model`` with its own AdamW, through ``make_train_step`` (forward,
    backward, clipping at ``grad_clip`` and the update: a real step on this device and precision):
    ``warmup`` untimed, the median of ``repeats``. The run itself is untouched: not its weights, not
    its optimizer, not its random streams. What the loop does besides the steps (the per-epoch
    checkpoint and sample grid) is not counted. ``timer(fn, device)`` returns the seconds of one
    call (replaced in tests)."""
    timer = timer or wall_time
    twin = copy.deepcopy(model).train()
    opt = make_optimizer(twin.parameters(), 1e-12, 0.0, device)
    # a real update of the copy, of no size
    train_step = make_train_step(twin, opt, diffusion, lr_fn=lambda s: 1e-12, grad_clip=grad_clip, device=device,
                                 precision=precision)
    batch = probe_batch(data, diffusion.timesteps, batch_size, device)

    def step():
        train_step(batch, 0)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(warmup):
            step()
        seconds = statistics.median(timer(step, device) for _ in range(repeats))
    return int(minutes * 60 // seconds), seconds


# ------------------------------------------------------------------------ loop

@dataclasses.dataclass(kw_only=True)
class FitSettings:
    """How ``fit`` runs: its length, schedule, clipping, device and precision, and what it tells the user."""
    max_steps: int
    lr_fn: Callable[[int], float]  # step -> learning rate
    grad_clip: float  # max gradient norm; 0 turns clipping off
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    desc: str = "train"  # progress bar and message prefix
    resume_hint: str = ""  # the exact command that continues this run
    lr_flag: str = "--lr"  # the flag to lower when the loss diverges
    checkpoint: str = ""  # the file on_interrupt writes: the resume hint is given only once it exists


@dataclasses.dataclass
class Hooks:
    on_epoch_end: Callable[[int, int, bool], None]  # (epoch, step, last): save, sample
    on_interrupt: Callable[[int, int], None]  # (epoch, step): save at the step boundary after Ctrl-C
    after_step: Optional[Callable[[int], None]] = None  # (step index): the EMA update
    # (steps done, loss of that step over all ranks, its lr), on every rank once the loss is known to be
    # finite: the loss log and previews (it runs before a Ctrl-C stop, so what it logs is what is saved)
    after_log: Optional[Callable[[int, float, float], None]] = None


class _StopAtBoundary:
    """While active, the first SIGINT only asks the loop to stop after the current step; a second one interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:  # asked twice: the user wants out now
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving (press Ctrl-C again to stop without saving)",
              file=sys.stderr)

    def __enter__(self):
        # signal handlers can only be set from the main thread; elsewhere Ctrl-C is not delivered anyway
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _Stop(Exception):
    pass


def fit(fwd_model, opt, diffusion, data, settings, step, hooks):
    """Train from ``step`` to ``settings.max_steps`` over epochs of ``epoch_batches``; returns (step, running loss).

    Calls ``hooks.on_epoch_end(epoch, step, last)`` after each epoch (epochs count from 1) and at
    the end. On Ctrl-C the current step finishes, ``hooks.on_interrupt(epoch, step)`` saves, and the
    process exits with 130. A loss that is not finite raises TrainingDiverged before the next
    save, so the last good checkpoint is never overwritten by NaN weights (the loss is
    all-reduced, and so is the stop request: every rank stops at the same step)."""
    device, dist_info = settings.device, data.dist
    n, steps_per_epoch = len(data.labels), data.steps_per_epoch
    train_step = make_train_step(fwd_model, opt, diffusion, lr_fn=settings.lr_fn, grad_clip=settings.grad_clip,
                                 device=device, precision=settings.precision, after_step=hooks.after_step)
    bar = None
    if dist_info.main:
        from tqdm import tqdm
        bar = tqdm(total=settings.max_steps, initial=step, desc=settings.desc, dynamic_ncols=True, mininterval=1.0)
    running = float("nan")
    fwd_model.train()
    stop = _StopAtBoundary()
    try:
        with stop:
            while step < settings.max_steps:
                epoch, first = divmod(step, steps_per_epoch)
                for idx in epoch_batches(n, data.global_batch, epoch, data.seed, dist_info)[first:]:
                    batch = data.batch(idx, diffusion.timesteps, device)
                    loss = train_step(batch, step)
                    step += 1
                    # the loss of the global batch (as one process would log it) and whether any rank was
                    # interrupted, in one all-reduce
                    both = all_reduce_mean(torch.stack([loss.detach().float(),
                                                        torch.tensor(float(stop.requested), device=device)]),
                                           dist_info)
                    lv, stop_now = both[0].item(), both[1].item() > 0
                    if not math.isfinite(lv):
                        raise TrainingDiverged(
                            f"{settings.desc}: the loss became {lv} at step {step} "
                            f"(lr {settings.lr_fn(step - 1):.2e}): "
                            f"training diverged. Nothing was saved after the last checkpoint, if any. Lower "
                            f"{settings.lr_flag} or keep --grad-clip on, then start again or continue from that "
                            f"checkpoint with: {settings.resume_hint}")
                    running = lv if running != running else 0.98 * running + 0.02 * lv
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{running:.4f}", lr=f"{settings.lr_fn(step - 1):.2e}", epoch=epoch + 1)
                    if hooks.after_log is not None:
                        hooks.after_log(step, lv, settings.lr_fn(step - 1))
                    if stop_now:
                        raise _Stop
                    if step >= settings.max_steps:
                        break
                last = step >= settings.max_steps
                if step % steps_per_epoch == 0 or last:
                    hooks.on_epoch_end(step // steps_per_epoch, step, last)
                if stop.requested and not last:  # Ctrl-C while saving or sampling: stop here
                    raise _Stop
    except _Stop:
        if bar is not None:
            bar.close()
        hooks.on_interrupt(step // steps_per_epoch, step)
        if dist_info.main:  # only rank 0 saved, so only rank 0 says so
            print(f"\ninterrupted at step {step}; saved; continue with: {settings.resume_hint}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if dist_info.main:
            if settings.checkpoint and os.path.exists(settings.checkpoint):
                print(f"\ninterrupted inside step {step + 1}: nothing saved since the last checkpoint; continue from "
                      f"it with: {settings.resume_hint}", file=sys.stderr)
            else:
                print(f"\ninterrupted inside step {step + 1}, before anything was saved: start the run again",
                      file=sys.stderr)
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()
    return step, running
