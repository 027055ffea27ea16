"""The DDPM forward process, the training loss for each objective, and sampling with classifier-free guidance.

``Diffusion.sample`` is the one entry to sampling: denoise.py, evaluate.py, train.py's grids and bench.py
all go through it (``generate`` wraps it with a seed, a precision and uint8 output); the samplers
themselves are small functions in samplers.py.

Names follow the papers:
  Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): linear betas,
      q_sample (eq. 4), the epsilon loss, the ancestral sampler (Algorithm 2);
  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models": the cosine schedule;
  Salimans & Ho 2022, "Progressive Distillation": v = sqrt(abar) eps - sqrt(1 - abar) x0;
  Karras et al. 2022, "Elucidating the Design Space" (EDM): the preconditioned denoiser, log-normal noise levels;
  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": zero terminal SNR;
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": out = out_c + w (out_c - out_u);
  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy".

The schedule is computed in float64 and stored as float32 buffers, so ``.to(device)`` moves it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import DiffusionConfig, SampleConfig
from dataset import to_uint8
from runtime import autocast
from samplers import GUIDANCE_INPUT, SAMPLERS, consistency_scalings

_DEFAULTS = DiffusionConfig()  # one place for the schedule's defaults: config.py


def linear_betas(timesteps, beta_start, beta_end):
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999.

    The linear schedule leaves a 28x28 image almost pure noise for the last third of the steps; this
    one destroys it evenly (on the fast preset that did not pay: experiments/cpu_levers)."""
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * torch.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas):
    """Algorithm 1 of Lin et al. 2024: shift and scale sqrt(abar) so that the last step is pure noise (abar_T = 0)
    and the first keeps its value; returns the new betas. The model then learns, and sampling starts from,
    the noise the sampler really starts from (the linear schedule leaves sqrt(abar_T) = 0.006 of the image)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def nearest_step(table, values):
    """For each of ``values``, the index of the nearest entry of the increasing 1-D ``table`` (log sigma per step)."""
    t = torch.searchsorted(table.contiguous(), values.contiguous()).clamp(max=len(table) - 1)
    below = (t - 1).clamp(min=0)
    return torch.where((values - table[below]).abs() < (table[t] - values).abs(), below, t)


def _extract(a, t, ndim):
    """a[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return a.gather(0, t).view(-1, *([1] * (ndim - 1)))


# ------------------------------------------------------------------ objectives
# What the network's output F stands for. x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, with ab = abar_t. Each
# objective is four small functions: the factor x_t is scaled by before the network (EDM's c_in), the
# target F is trained towards, the x0 that an F implies, and how the squared error on F relates to the
# error on x0 (|F - target|^2 = x0_scale(snr) |x0_hat - x0|^2), which Min-SNR weighting divides out.
SIGMA_DATA = 0.5  # EDM's sigma_data for images in [-1, 1] (Karras et al. 2022, Table 1)


def _edm_d(ab):
    """(sigma^2 + sigma_data^2) abar, with EDM's sigma^2 = (1 - abar) / abar: finite where abar = 0."""
    return 1 - ab + SIGMA_DATA ** 2 * ab


def _edm_skip(ab):
    """EDM's c_skip / sqrt(abar): D = _edm_skip x_t + _edm_out F."""
    return SIGMA_DATA ** 2 * ab.sqrt() / _edm_d(ab)


def _edm_out(ab):
    """EDM's c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), written in abar."""
    return SIGMA_DATA * (1 - ab).sqrt() * _edm_d(ab).rsqrt()


@dataclasses.dataclass(frozen=True)
class Objective:
    in_scale: Optional[Callable]  # ab -> the factor x_t is scaled by before the network; None: 1
    target: Callable  # (x0, eps, ab) -> what F is trained towards
    to_x0: Callable  # (F, x_t, ab) -> the clean image F implies
    x0_scale: Callable  # snr -> |F - target|^2 / |x0_hat - x0|^2


OBJECTIVES = {
    # Ho et al. 2020: F is the noise; x0 = (x - sqrt(1 - ab) F) / sqrt(ab), undefined where ab = 0
    "eps": Objective(None, lambda x0, eps, ab: eps,
                     lambda f, x, ab: (x - (1 - ab).sqrt() * f) / ab.sqrt(),
                     lambda snr: snr),
    # Salimans & Ho 2022, eq. 10: F is v = sqrt(ab) eps - sqrt(1 - ab) x0; x0 = sqrt(ab) x - sqrt(1 - ab) F
    "v": Objective(None, lambda x0, eps, ab: ab.sqrt() * eps - (1 - ab).sqrt() * x0,
                   lambda f, x, ab: ab.sqrt() * x - (1 - ab).sqrt() * f,
                   lambda snr: snr + 1),
    # Karras et al. 2022, eq. 7 and Table 1: D = c_skip x_hat + c_out F(c_in x_hat), x_hat = x / sqrt(ab);
    # its loss weight 1 / c_out^2 makes the loss on F unweighted. sigma_data = 1 would be v, with F = -v.
    "edm": Objective(lambda ab: _edm_d(ab).rsqrt(),
                     lambda x0, eps, ab: (x0 - _edm_skip(ab) * (ab.sqrt() * x0 + (1 - ab).sqrt() * eps)) / _edm_out(ab),
                     lambda f, x, ab: _edm_skip(ab) * x + _edm_out(ab) * f,
                     lambda snr: snr + 1 / SIGMA_DATA ** 2),
}

# EDM's log-normal training noise levels: ln(sigma) ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1)
LOGNORMAL_MEAN, LOGNORMAL_STD = -1.2, 1.2
# LCM's skipping-step grid: 50 steps of a DDIM, k = T / 50 apart (Luo et al. 2023, Section 4.3: skip k = 20 of 1,000)
LCM_SKIP = 50


def schedule_buffers(betas):
    """Everything the forward process, the loss and the samplers read, from the betas (float64): abar, its roots,
    the SNR, EDM's log sigma and the posterior q(x_{t-1} | x_t, x_0) of eq. 6-7 of Ho et al."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
        snr=alphas_cumprod / (1 - alphas_cumprod),
        # EDM's log sigma, sigma = sqrt((1 - abar) / abar), increasing in t: where log-normal draws land
        log_sigma=0.5 * (torch.log1p(-alphas_cumprod) - torch.log(alphas_cumprod)),
        posterior_variance=posterior_variance,
        # log of the variance, clipped at t=0 where it is 0 (as in the reference implementation)
        posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
    )


class StepWatcher:
    """What Diffusion.sample does after each step: advance the progress bar, call the callback with the step's
    x0 estimate, and keep ``num_frames`` snapshots of x_t (the first, pure noise, taken at the start)."""

    def __init__(self, x, num_steps, num_frames, progress, callback):
        self.num_steps, self.callback = num_steps, callback
        self.keep = set()
        if num_frames > 1:
            self.keep = set(torch.linspace(0, num_steps - 1, num_frames - 1).round().long().tolist())
        self.frames = [x.clone()] if num_frames > 0 else []
        bar = progress(range(num_steps)) if progress else None
        self.bar_iter = iter(bar) if bar is not None else None

    def __call__(self, i, x_i, x0):
        if self.bar_iter is not None:
            next(self.bar_iter, None)
        if self.callback is not None:
            self.callback(i, self.num_steps, x0)
        if i in self.keep:
            self.frames.append(x_i.clamp(-1, 1).clone())

    def close(self):
        if self.bar_iter is not None:
            next(self.bar_iter, None)  # let a progress bar close


class StepGrids:
    """The steps each sampler visits, noisiest first, on a schedule of ``timesteps`` steps with per-step
    ``log_sigma``: Diffusion's, kept apart from the forward process and the loss."""

    def sample_timesteps(self, sampler, steps):
        """The steps a sampler visits, noisiest first (the noisiest step T-1 always: Lin et al.'s "trailing").

        ddpm takes all T. ddim takes ``steps`` evenly spaced in t, as Song et al. did. The second-order samplers
        step evenly in log-SNR, as Lu et al. 2022 advise: evenly in t, the last step (from t = T/steps to 0)
        spans half the log-SNR range, and extrapolating across it overshot a Gaussian's spread
        (experiments/sampler_guidance/notes.md, "The step grid")."""
        if sampler == "ddpm":
            return list(range(self.timesteps - 1, -1, -1))
        if sampler == "lcm":
            return self.lcm_timesteps(steps)
        if sampler == "ddim" or steps >= self.timesteps:
            return self.ddim_timesteps(steps)
        return self.logsnr_timesteps(steps)

    def ddim_timesteps(self, steps):
        if not 0 < steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps} (the model's T), got {steps}")
        return torch.linspace(self.timesteps - 1, 0, steps).round().long().unique_consecutive().tolist()

    def skip_grid(self, num_steps=None):
        """LCM's skipping-step grid, noisiest last: the ``num_steps`` steps t = k j - 1 (j = 1..num_steps) of a
        DDIM with skip k = T / num_steps (LCM_SKIP steps, capped at T). Distillation trains on it, sampling
        picks from it."""
        n = min(num_steps or LCM_SKIP, self.timesteps)
        k = self.timesteps // n
        return [k * j - 1 for j in range(1, n + 1)]

    def lcm_timesteps(self, steps):
        """``steps`` steps of the skipping-step grid, evenly spaced from its noisiest (LCM's scheduler: 999, 759,
        499, 259 for 4 of 1,000); more steps than the grid has fall back to DDIM's."""
        grid = self.skip_grid()[::-1]
        if steps > len(grid):
            return self.ddim_timesteps(steps)
        if steps <= 0:
            raise ValueError(f"steps must be in 1..{self.timesteps} (the model's T), got {steps}")
        return [grid[i * len(grid) // steps] for i in range(steps)]

    def logsnr_timesteps(self, steps):
        """``steps`` steps from T-1 to 0, evenly spaced in log sigma (minus the half log-SNR), each snapped to the
        nearest step of the schedule. Under zero terminal SNR (sigma infinite at T-1) the grid starts at T-2."""
        if not 0 < steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps} (the model's T), got {steps}")
        ls = self.log_sigma.double().cpu()
        top = self.timesteps - 1 if torch.isfinite(ls[-1]) else self.timesteps - 2
        grid = torch.linspace(float(ls[top]), float(ls[0]), steps, dtype=torch.float64)
        t = nearest_step(ls[:top + 1], grid)
        t[0] = self.timesteps - 1
        return t.unique_consecutive().tolist()


class Diffusion(StepGrids, nn.Module):
    def __init__(self, timesteps=_DEFAULTS.timesteps, beta_start=_DEFAULTS.beta_start, beta_end=_DEFAULTS.beta_end,
                 min_snr_gamma=_DEFAULTS.min_snr_gamma, schedule=_DEFAULTS.schedule, *, objective=_DEFAULTS.objective,
                 t_sampling=_DEFAULTS.t_sampling, zero_terminal_snr=_DEFAULTS.zero_terminal_snr,
                 bounded_loss=_DEFAULTS.bounded_loss):
        super().__init__()
        self.timesteps = timesteps
        self.min_snr_gamma = min_snr_gamma
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule {schedule!r}; choose linear or cosine")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose {', '.join(OBJECTIVES)}")
        if zero_terminal_snr and objective == "eps":
            raise ValueError("zero terminal SNR needs objective v or edm: at abar = 0 the noise says nothing of x0")
        self.objective, self.t_sampling, self.bounded_loss = objective, t_sampling, bounded_loss
        self._obj = OBJECTIVES[objective]
        betas = linear_betas(timesteps, beta_start, beta_end) if schedule == "linear" else cosine_betas(timesteps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        for name, value in schedule_buffers(betas).items():
            self.register_buffer(name, value.float(), persistent=False)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.min_snr_gamma, cfg.schedule,
                   objective=cfg.objective, t_sampling=cfg.t_sampling, zero_terminal_snr=cfg.zero_terminal_snr,
                   bounded_loss=cfg.bounded_loss)

    # ------------------------------------------------------------- training

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4); the tutorial's forward_diffusion."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def draw_t(self, n, generator, lo=0, hi=None):
        """n training steps t in lo..hi-1: uniform, or EDM's log-normal sigma snapped to the nearest step.

        Drawn from ``generator`` alone, so a resumed run draws the same t (its state is saved)."""
        hi = self.timesteps if hi is None else hi
        if self.t_sampling == "uniform":
            return torch.randint(lo, hi, (n,), generator=generator)
        log_sigma = LOGNORMAL_MEAN + LOGNORMAL_STD * torch.randn(n, generator=generator)
        return nearest_step(self.log_sigma.cpu(), log_sigma).clamp(lo, hi - 1)

    def loss_weight(self, t):
        """Min-SNR-gamma (Hang et al. 2023, eq. 8): the error on x0 weighted min(SNR, gamma), written for this
        objective's output: min(SNR, gamma) / x0_scale(SNR); for the noise that is min(SNR, gamma) / SNR.

        It down-weights the many low-noise steps whose target is nearly fixed, which speeds convergence
        several-fold in their measurements; gamma = 0 gives the plain MSE on the objective's output."""
        if self.min_snr_gamma <= 0:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr.gather(0, t)
        return snr.clamp(max=self.min_snr_gamma) / self._obj.x0_scale(snr)

    def model_output(self, model, x, t, labels, w=None):
        """The network's output F at x_t (scaled by the objective's c_in first, for EDM); ``w`` (B,), the guidance
        scale, goes to a network that takes it (a speed adapter's, distill.py)."""
        if self._obj.in_scale is not None:
            x = x * _extract(self._obj.in_scale(self.alphas_cumprod), t, x.ndim).to(x.dtype)
        return model(x, t, labels) if w is None else model(x, t, labels, w=w)

    def loss(self, model, x0, labels, t, noise):
        """Weighted MSE between the network's output and the objective's target, mean over the batch.

        With ``bounded_loss``, a pixel whose data sits at an end of the range (x0 = -1, MNIST's background, or +1)
        costs nothing where the implied x0 lies past that end: every sampler clips the estimate to [-1, 1], which
        turns it into exactly the data. Plain MSE pulls the estimate towards -1 from both sides, so about half the
        background lands a few levels above black (a grey haze); forgiven the far side, the network can settle
        past -1 (experiments/time_to_quality/bounded_loss)."""
        x_t = self.q_sample(x0, t, noise)
        out = self.model_output(model, x_t, t, labels).float()
        ab = _extract(self.alphas_cumprod, t, x0.ndim)
        err = out - self._obj.target(x0, noise, ab)
        if self.bounded_loss:
            err = forgive_past_ends(err, x0, self._obj.to_x0(out, x_t, ab) - x0)
        per_sample = err.square().mean(dim=(1, 2, 3))
        return (per_sample * self.loss_weight(t)).mean()

    def predict_x0(self, model, x, t, labels, w=None):
        """The clean image the network implies at x_t for a batch of steps ``t`` (B,), in fp32, unclipped."""
        out = self.model_output(model, x, t, labels, w).float()
        return self._obj.to_x0(out, x, _extract(self.alphas_cumprod, t, x.ndim))

    def consistency(self, model, x, t, labels, w=None):
        """LCM's consistency function f(x_t, t) = c_skip x_t + c_out x0_hat (samplers.consistency_scalings)."""
        c_skip, c_out = (c.float().view(-1, *([1] * (x.ndim - 1))) for c in consistency_scalings(t))
        return c_skip * x + c_out * self.predict_x0(model, x, t, labels, w)

    def to_x0(self, out, x, t):
        """The clean image the network's output ``out`` implies at x_t, for this objective; t is an int."""
        return self._obj.to_x0(out, x, self.alphas_cumprod[t])

    # ------------------------------------------------------------- sampling

    def guided_output(self, model, x, t, labels, guidance, null_label):
        """The network's output with classifier-free guidance, in one batched forward pass.

        Conditional and unconditional halves go through the UNet together (2B images), which on every device is
        cheaper than two calls of B; with guidance 0 only the conditional pass runs. Guidance on the output is
        guidance on x0, since x0 is affine in the output at a given x_t and t."""
        if guidance == 0:
            return self.model_output(model, x, _step_batch(x, t), labels).float()
        out_c, out_u = self.both_outputs(model, x, t, labels, null_label)
        return out_c + guidance * (out_c - out_u)

    def both_outputs(self, model, x, t, labels, null_label):
        """(conditional, unconditional) outputs at x_t in fp32, from one batched forward pass of 2B images."""
        t_batch = _step_batch(x, t)
        out = self.model_output(model, torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                                torch.cat([labels, torch.full_like(labels, null_label)])).float()
        return out.chunk(2)

    def guided_x0(self, model, x, t, labels, guidance, null_label, parallel=1.0):
        """The guided estimate of x0 at step ``t`` (int), unclipped. ``parallel`` 1: classifier-free guidance as
        ``guided_output`` (the same numbers); below 1, the guidance's push is projected (``project_guidance``)."""
        if guidance == 0 or parallel == 1:
            return self.to_x0(self.guided_output(model, x, t, labels, guidance, null_label), x, t)
        out_c, out_u = self.both_outputs(model, x, t, labels, null_label)
        return project_guidance(self.to_x0(out_c, x, t), self.to_x0(out_u, x, t), guidance, parallel)

    @torch.no_grad()
    def sample(self, model, labels, shape, *, sampler="ddim", steps=50, eta=0.0, guidance=0.0,
               guidance_interval=(0.0, 1.0), null_label=None, generator=None, num_frames=0, progress=None,
               callback=None, init=None, strength=1.0, threshold=0.0, guidance_parallel=1.0):
        """Generate images for ``labels``; returns (x0, frames).

        With ``init`` (B, C, H, W) in [-1, 1], image to image (SDEdit, Meng et al. 2021): ``init`` is noised to
        t = strength x (T - 1) by q_sample and only the sampler's steps from there down run. Strength 1 is plain
        sampling from the same noise (init unused); strength 0 runs no step and returns ``init``.

        frames is a list of ``num_frames`` snapshots of x_t from pure noise to the result, for the
        denoising-process figure (empty when num_frames is 0). ``generator`` makes it reproducible.
        ``guidance`` applies at the steps with lo <= t / T <= hi for ``guidance_interval`` (lo, hi).
        ``threshold`` p > 0: each step's estimate is clipped by dynamic thresholding (``clip_x0``), not to [-1, 1].
        ``guidance_parallel`` below 1 projects the guidance (``project_guidance``); 1 is plain guidance.

        ``callback(step_index, num_steps, x0_estimate)``, when given, runs after each of the
        ``num_steps`` steps (step_index 0..num_steps-1) with that step's clipped estimate of the final
        image, (B, C, H, W) in [-1, 1]: a page can show the digit as it forms. It must not change the
        tensor in place; it changes nothing else, so the samples are the same with it as without, and
        the last estimate is the result. An exception it raises stops the sampling there (bench.py
        times the first steps of DDPM so).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
        lo, hi = guidance_interval
        device = self.betas.device
        null_label = model.num_classes if null_label is None else null_label
        takes_w = getattr(model, "w_embed", None) is not None
        x = torch.randn(shape, generator=generator, device=device)
        ts = self.sample_timesteps(sampler, steps)
        if init is not None and strength < 1:
            if not 0 <= strength <= 1:
                raise ValueError(f"strength must be in [0, 1], got {strength}")
            ts = [t for t in ts if t <= strength * (self.timesteps - 1)] if strength > 0 else []
            if not ts:
                return init.clamp(-1, 1), [init.clamp(-1, 1).clone()] * min(num_frames, 1)
            x = self.q_sample(init.to(x.dtype), torch.full((shape[0],), ts[0], device=device), x)

        def denoise(x_t, t):  # the guided, clipped estimate of x0 at step t
            w = guidance if lo * self.timesteps <= t <= hi * self.timesteps else 0.0
            if sampler in GUIDANCE_INPUT:  # one pass; w is the network's input where it takes one
                t_b = _step_batch(x_t, t)
                w_b = torch.full((x_t.shape[0],), float(w), device=x_t.device) if takes_w else None
                return clip_x0(self.consistency(model, x_t, t_b, labels, w_b), threshold)
            return clip_x0(self.guided_x0(model, x_t, t, labels, w, null_label, guidance_parallel), threshold)

        on_step = StepWatcher(x, len(ts), num_frames, progress, callback)
        x = SAMPLERS[sampler](denoise, x, ts, self, eta=eta, generator=generator, on_step=on_step)
        on_step.close()
        return x.clamp(-1, 1), on_step.frames


def _step_batch(x, t):
    """The step ``t`` as a (B,) tensor for x's batch; a tensor of steps is returned as it is."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long) if isinstance(t, int) else t


def forgive_past_ends(err, data, past):
    """``err`` with 0 where ``data`` sits at an end of [-1, 1] and ``past`` (the estimate minus the data) lies beyond
    that end: the samplers' clip turns such an estimate into exactly the data. The bounded loss's rule, and the
    speed adapter's consistency loss's (distill.py)."""
    return err.masked_fill(((data <= -1) & (past < 0)) | ((data >= 1) & (past > 0)), 0.0)


def project_guidance(x0_c, x0_u, guidance, parallel):
    """Guidance on x0 with its push split in two, after adaptive projected guidance (Sadat et al. 2024, "Eliminating
    Oversaturation and Artifacts of High Guidance Scales"): d = x0_c - x0_u; the part of d along the conditional
    image itself, d_par = (<d, a> / <a, a>) a per image, and the rest, d_perp = d - d_par; the result is
    x0_c + guidance (d_perp + parallel d_par), so ``parallel`` 1 is classifier-free guidance and 0 drops d_par.

    a is x0_c + 1, the image with black at 0, not x0_c: along a, the push draws the same strokes heavier (more
    ink) while d_perp changes their shape (which digit). Projected on x0_c in [-1, 1], whose background is -1,
    the parallel part is a contrast change instead, and dropping it drew heavier ink, not lighter
    (experiments/time_to_quality/projected_guidance). An all-black x0_c has no parallel part. ``parallel`` 1 is
    written as plain guidance, x0_c + guidance d, so that it gives plain guidance's very numbers."""
    d = x0_c - x0_u
    if parallel == 1:
        return x0_c + guidance * d
    a = (x0_c + 1).flatten(1)
    aa = a.square().sum(1, keepdim=True)
    coef = torch.where(aa > 0, (d.flatten(1) * a).sum(1, keepdim=True) / aa.clamp(min=torch.finfo(aa.dtype).tiny), 0)
    d_par = (coef * a).view_as(d)
    return x0_c + guidance * (d - d_par + parallel * d_par)


def clip_x0(x0, threshold=0.0):
    """The estimate x0 kept in the data's range [-1, 1]. ``threshold`` 0: clipped there (static). p > 0: dynamic
    thresholding (Saharia et al. 2022): s = the p-th quantile of |x0| over each image's pixels, at least 1; x0 is
    clipped to [-s, s] and divided by s, so that pixels past the range pull the image back in proportion rather
    than saturating. An image already inside [-1, 1] is unchanged either way."""
    if not threshold:
        return x0.clamp(-1, 1)
    s = torch.quantile(x0.flatten(1).abs().float(), threshold, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


@torch.no_grad()
def generate(model, diffusion, labels, device, precision="fp32", cfg=None, *, seed=0, data_size=None, num_frames=0,
             progress=None, callback=None, init=None, strength=1.0):
    """Sample one image per label in ``precision`` with ``cfg`` (a SampleConfig: sampler, steps, eta, guidance;
    the defaults when None) through ``Diffusion.sample``; returns (uint8 images (N, H, W), list of uint8 frames).
    ``callback`` is Diffusion.sample's: it sees each step's x0 estimate in the model's range, not uint8.

    A torch.Generator seeded with ``seed`` makes the result the same on every run; images are
    resized back to ``data_size`` (the data set's side) when the model works at another size. ``init`` and
    ``strength``: image to image, as Diffusion.sample (init in the model's range and size; one image (1, C, H, W)
    starts every sample)."""
    cfg = cfg or SampleConfig()
    g = torch.Generator(device).manual_seed(seed)
    labels = labels.to(device)
    shape = (len(labels), model.cfg.in_channels, model.cfg.img_size, model.cfg.img_size)
    with autocast(device, precision):
        x, frames = diffusion.sample(model, labels, shape, sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta,
                                     guidance=cfg.guidance, guidance_interval=cfg.guidance_interval,
                                     threshold=cfg.threshold, guidance_parallel=cfg.guidance_parallel, generator=g,
                                     num_frames=num_frames, progress=progress, callback=callback,
                                     init=None if init is None else init.to(device).expand(shape), strength=strength)
    return to_uint8(x, data_size), [to_uint8(f, data_size) for f in frames]
