"""A speed adapter: the frozen base's guided sampling distilled into a LoRA by latent consistency distillation.

    python lora_finetune.py --distill lcm --out out/lcm             # -> out/lcm/, an adapter of kind "lcm"
    python denoise.py --lora out/lcm --sampler lcm --steps 4         # 4 network evaluations an image, no CFG pass
    python denoise.py --lora out/lcm --lora out/lora --sampler lcm --steps 4 --merge   # stacked with a style

Luo et al. 2023, "Latent Consistency Models" (Algorithm 1, LCD) and "LCM-LoRA"; Song et al. 2023, "Consistency
Models". One step of the loop, on a batch of real digits x0 with their labels:

  1. t_{n+k} from the skipping-step grid (Diffusion.skip_grid: 19, 39, ..., 999 of 1,000, k = 20 apart), t_n =
     t_{n+k} - k (0 below the grid), x_{t_{n+k}} = q_sample(x0, t_{n+k}, noise), and w ~ U[lo, hi] (--distill-w).
  2. The teacher, the base alone (the adapter at weight 0), guided at w on its x0 (its objective's output turned
     into x0, so eps, v and edm bases distil alike; plain guidance, LCM's, unless --distill-guidance-parallel
     projects it) and on the noise that x0 implies; one DDIM step to x_hat_{t_n}.
  3. The target, base + the EMA of the adapter's tensors (the base is frozen, so an EMA of the adapter is an EMA of
     the network), f(x_hat_{t_n}, t_n, w), with f = c_skip x + c_out x0_hat (samplers.consistency_scalings).
  4. The student, base + the adapter, f(x_{t_{n+k}}, t_{n+k}, w); the loss is pseudo-Huber (LCM's) or L2 of the
     difference; only the adapter's tensors train, its LoRA pairs and its guidance input (lora.GuidanceEmbedding:
     w's embedding added to the step's, which LCM-LoRA leaves out and full LCM has); then the EMA moves.

The student, not the EMA target, is what is saved, as LCM-LoRA does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch

from adapter import Adapter, adapter_from_model, add_adapter_layers
from adapter_formats import adapter_size, write_adapter
from cli import config_from_args, runtime_from_args
from config import DistillConfig, LoraConfig, TrainConfig
from diffusion import clip_x0, forgive_past_ends, project_guidance
from dataset import to_model_range
from errors import CLIError
from files import lock_output, remove_stale_temps
from logs import LogPaths, LossLog, loss_curve_png
from model_card import CardFacts, write_card
from lora import add_guidance_input, mark_only_lora_as_trainable, set_lora_weight
from pipeline import load_pipeline
from runtime import setup_distributed
from trainer import LORA_GRAD_CLIP, load_dataset_distributed, lora_lr_at, make_optimizer


@dataclasses.dataclass
class DistillBatch:
    """One step's draw: digits, labels, the grid step t_{n+k} (``t``) and the one below it t_n (``t_prev``), the
    noise that makes x_{t_{n+k}}, and the guidance w, each (B,) or (B, C, H, W)."""
    x0: torch.Tensor
    labels: torch.Tensor
    t: torch.Tensor
    t_prev: torch.Tensor
    noise: torch.Tensor
    w: torch.Tensor


def draw_batch(diffusion, x0, labels, gen, w_range):
    """Step 1: t_{n+k} uniform over the skipping-step grid, t_n = t_{n+k} - k, noise, w ~ U[lo, hi]; from ``gen``."""
    grid = torch.tensor(diffusion.skip_grid())
    k = diffusion.timesteps // len(grid)
    t = grid[torch.randint(0, len(grid), (x0.shape[0],), generator=gen)]
    noise = torch.randn(x0.shape, generator=gen)
    lo, hi = w_range
    w = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)
    dev = x0.device
    return DistillBatch(x0, labels, t.to(dev), (t - k).clamp(min=0).to(dev), noise.to(dev), w.to(dev))


@torch.no_grad()
def teacher_step(model, diffusion, x_t, b, name="default", parallel=1.0):
    """Step 2: the base alone, guided at w (out_c + w (out_c - out_u), on x0 and so on the noise it implies at
    x_t; with ``parallel`` below 1 projected, as the sampler's --guidance-parallel: diffusion.project_guidance), x0
    clipped to the data's range as every sampler clips it, then DDIM's step (Song et al. 2021, eq. 12, eta 0) from
    t_{n+k} to t_n."""
    set_lora_weight(model, 0.0, name)
    try:
        null = torch.full_like(b.labels, model.num_classes)
        x0_c, x0_u = diffusion.predict_x0(model, torch.cat([x_t, x_t]), torch.cat([b.t, b.t]),
                                          torch.cat([b.labels, null])).chunk(2)
    finally:
        set_lora_weight(model, 1.0, name)
    x0 = clip_x0(project_guidance(x0_c, x0_u, b.w.view(-1, 1, 1, 1), parallel))  # clipped, as the samplers' are
    ab = diffusion.alphas_cumprod[b.t].view(-1, 1, 1, 1)
    ab_prev = diffusion.alphas_cumprod[b.t_prev].view(-1, 1, 1, 1)
    eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


@contextlib.contextmanager
def swapped_in(params, values):
    """``params`` hold ``values`` inside the block (the EMA target), their own tensors again after it."""
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, own):
                p.copy_(v)


def consistency_loss(pred, target, dcfg):
    """Pseudo-Huber, sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, LCM's), or L2; the mean over every pixel.

    Both ends are read as the LCM sampler reads them, clipped to the data's range: the target is clipped, and where
    it sits at an end a prediction past that end costs nothing (the bounded loss's rule, diffusion.Diffusion.loss).
    A base trained with that loss leaves its background estimates past -1 by any amount; matching those amounts
    would spend the adapter on what the sampler throws away."""
    target = target.float().clamp(-1, 1)
    d = pred.float() - target
    d = forgive_past_ends(d, target, d)
    if dcfg.distill_loss == "l2":
        return d.pow(2).mean()
    c = dcfg.distill_huber_c
    return ((d.pow(2) + c * c).sqrt() - c).mean()


def distill_loss(model, diffusion, b, params, ema, dcfg, name="default"):
    """Steps 2-4 for one batch: the loss on the student, its graph reaching ``params`` (the adapter's tensors).

    The teacher and the target run first, without a graph: the target swaps the EMA into ``params`` in place,
    which would break the student's graph were it built already."""
    x_t = diffusion.q_sample(b.x0, b.t, b.noise)
    x_prev = teacher_step(model, diffusion, x_t, b, name, dcfg.distill_guidance_parallel)
    with torch.no_grad(), swapped_in(params, ema):
        target = diffusion.consistency(model, x_prev, b.t_prev, b.labels, b.w)
    pred = diffusion.consistency(model, x_t, b.t, b.labels, b.w)
    return consistency_loss(pred, target, dcfg)


@torch.no_grad()
def ema_update(ema, params, decay):
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def check_distill_flags(args):
    """The fine-tune flags a distillation cannot honour, refused before any work."""
    if args.full:
        raise CLIError("--distill lcm trains an adapter; drop --full")
    if args.resume is not None:
        raise CLIError("--distill lcm does not resume (a distillation is short); run it again with --overwrite")
    sized = [f"--{n.replace('_', '-')}" for n in ("lora_steps", "lora_batch_size")
             if getattr(args, n, None) is not None]
    if sized:
        raise CLIError(f"--distill lcm takes --distill-steps and --distill-batch-size, its own: drop {', '.join(sized)}")
    given = [f"--{n.replace('_', '-')}" for n in ("style", "data", "augment", "prior_weight", "lora_t_range")
             if getattr(args, n, None) not in (None, "")]
    if given:
        raise CLIError(f"--distill lcm learns the base's own sampling, from the digits it was trained on: drop "
                       f"{', '.join(given)}")


def refuse_distill_flags(args):
    """--distill-* flags without --distill would change nothing: say so rather than ignore them."""
    given = [f"--{n.replace('_', '-')}" for n in DistillConfig.__dataclass_fields__ if getattr(args, n, None) is not None]
    if given:
        raise CLIError(f"{', '.join(given)} apply to --distill lcm only: add --distill lcm or drop them")


def distill(args, log=print):
    """lora_finetune.py --distill lcm, after its output checks: train and write the speed adapter at args.out."""
    check_distill_flags(args)
    dcfg = config_from_args(args, DistillConfig, args.preset)
    lcfg = dataclasses.replace(config_from_args(args, LoraConfig, args.preset), style="none",
                               lora_steps=dcfg.distill_steps, lora_batch_size=dcfg.distill_batch_size)
    tcfg = config_from_args(args, TrainConfig, args.preset)
    rcfg = runtime_from_args(args)
    if rcfg.precision not in ("auto", "fp32"):
        raise CLIError(f"--distill lcm trains in fp32 (the teacher's one-step targets are small differences); drop "
                       f"--precision {rcfg.precision}")
    dist_info, device = setup_distributed(rcfg.device)
    if dist_info.world > 1:
        raise CLIError("--distill lcm runs in one process; run it without torchrun")
    spec = None

    def attach(model, fingerprint):
        nonlocal spec
        torch.manual_seed(rcfg.seed)  # A's random init, the same on every run
        spec = Adapter.new(lcfg, fingerprint, base_path=args.ckpt).replace(kind="lcm")
        add_adapter_layers(model, spec)
        add_guidance_input(model)

    pipe = load_pipeline(args.ckpt, device, args.weights, attach=attach)
    model, diffusion = pipe.model, pipe.diffusion
    trainable, total = mark_only_lora_as_trainable(model)  # the guidance input's lora_w included
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = make_optimizer(params, lcfg.lora_lr, 0.0, device)
    data = load_dataset_distributed(tcfg.dataset, "train", tcfg.data_dir, dist_info, log)
    if lcfg.lora_batch_size > len(data):
        raise CLIError(f"batch {lcfg.lora_batch_size} is larger than the {len(data)} images; lower --distill-batch-size")
    images, labels = to_model_range(data.images, model.cfg.img_size).to(device), data.labels.to(device)
    lock_output(args.out, "--out", folder=True, log=log)
    remove_stale_temps(os.path.dirname(os.path.abspath(args.out)), log)
    log(f"distill: lcm from {args.ckpt} (fingerprint {pipe.fingerprint}), w in {dcfg.distill_w}, "
        f"{dcfg.distill_loss} loss, EMA {dcfg.distill_ema}; trainable {trainable:,} of {total:,} parameters; "
        f"{lcfg.lora_steps} steps of batch {lcfg.lora_batch_size} at lr {lcfg.lora_lr} on {device}, fp32")
    paths = LogPaths.of(args.out, folder=True)
    loss_log = LossLog(paths.csv, lcfg.lora_batch_size)
    gen = torch.Generator().manual_seed(rcfg.seed + 2)
    start, loss, step = time.time(), torch.zeros(()), 0
    try:
        for step in range(lcfg.lora_steps):
            pick = torch.randint(0, len(images), (lcfg.lora_batch_size,), generator=gen).to(device)
            b = draw_batch(diffusion, images[pick], labels[pick], gen, dcfg.distill_w)
            lr = lora_lr_at(step, lcfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = distill_loss(model, diffusion, b, params, ema, dcfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, LORA_GRAD_CLIP)
            opt.step()
            ema_update(ema, params, dcfg.distill_ema)
            loss_log.step(step + 1, loss.item(), lr)
    except KeyboardInterrupt:  # Ctrl-C: the adapter as far as it got, whole, then the usual exit
        write_adapter(args.out, adapter_from_model(model, spec))
        log(f"distill: interrupted at step {step}; the adapter so far is in {args.out}")
        raise
    finally:
        loss_log.close()
    adapter = adapter_from_model(model, spec)
    write_adapter(args.out, adapter)
    facts = CardFacts(data="the base's own guided sampling (latent consistency distillation)", steps=lcfg.lora_steps,
                      lr=lcfg.lora_lr, command=getattr(args, "command", None),
                      notes=("A speed adapter: sample with `--sampler lcm --steps 4`.",))
    write_card(args.out, adapter, facts)
    loss_curve_png(paths.csv, paths.curve, f"lora_finetune.py --distill lcm: r={lcfg.r}, w {dcfg.distill_w}, "
                   f"lr {lcfg.lora_lr}")
    log(f"distill: done, {lcfg.lora_steps} steps in {(time.time() - start) / 60:.1f} min, loss {loss.item():.4g}; "
        f"speed adapter {args.out} ({adapter_size(args.out) / 1024:.0f} KB); sample with: python denoise.py "
        f"--lora {args.out} --sampler lcm --steps 4")
    return args.out
