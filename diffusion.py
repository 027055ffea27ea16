"""DDPM forward process, training loss and two samplers, with classifier-free guidance.

``Diffusion.sample`` is the one sampler: denoise.py, evaluate.py, train.py's grids and bench.py all go
through it (``generate`` wraps it with a seed, a precision and uint8 output).

Names follow the papers:
  Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): linear betas,
      q_sample (eq. 4), the epsilon loss, the ancestral sampler p_sample (Algorithm 2);
  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models": the cosine schedule;
  Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM, eq. 12), with eta;
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": eps = eps_c + w (eps_c - eps_u);
  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy".

The schedule is computed in float64 and stored as float32 buffers, so ``.to(device)`` moves it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import DiffusionConfig, SampleConfig
from dataset import to_uint8
from runtime import autocast

_DEFAULTS = DiffusionConfig()  # one place for the schedule's defaults: config.py


def linear_betas(timesteps, beta_start, beta_end):
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999.

    The linear schedule leaves a 28x28 image almost pure noise for the last third of the steps; this
    one destroys it evenly (on the fast preset that did not pay: experiments/cpu_levers)."""
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * torch.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def _extract(a, t, ndim):
    """a[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return a.gather(0, t).view(-1, *([1] * (ndim - 1)))


class Diffusion(nn.Module):
    def __init__(self, timesteps=_DEFAULTS.timesteps, beta_start=_DEFAULTS.beta_start, beta_end=_DEFAULTS.beta_end,
                 min_snr_gamma=_DEFAULTS.min_snr_gamma, schedule=_DEFAULTS.schedule):
        super().__init__()
        self.timesteps = timesteps
        self.min_snr_gamma = min_snr_gamma
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule {schedule!r}; choose linear or cosine")
        betas = linear_betas(timesteps, beta_start, beta_end) if schedule == "linear" else cosine_betas(timesteps)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # posterior q(x_{t-1} | x_t, x_0), eq. 6-7 of Ho et al.
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            snr=alphas_cumprod / (1 - alphas_cumprod),
            posterior_variance=posterior_variance,
            # log of the variance, clipped at t=0 where it is 0 (as in the reference implementation)
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.min_snr_gamma, cfg.schedule)

    # ------------------------------------------------------------- training

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4); the tutorial's forward_diffusion."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def loss_weight(self, t):
        """Min-SNR-gamma weight for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023, eq. 8).

        It down-weights the many low-noise steps whose epsilon is nearly unpredictable, which
        speeds convergence several-fold in their measurements; gamma = 0 gives plain MSE."""
        if self.min_snr_gamma <= 0:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr.gather(0, t)
        return snr.clamp(max=self.min_snr_gamma) / snr

    def loss(self, model, x0, labels, t, noise):
        """Weighted MSE between the true and predicted noise, mean over the batch."""
        x_t = self.q_sample(x0, t, noise)
        eps = model(x_t, t, labels)
        per_sample = F.mse_loss(eps.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.loss_weight(t)).mean()

    # ------------------------------------------------------------- sampling

    def predict_eps(self, model, x, t, labels, guidance, null_label):
        """Noise prediction with classifier-free guidance in one batched forward pass.

        Conditional and unconditional halves go through the UNet together (2B images), which on
        every device is cheaper than two calls of B; with guidance 0 only the conditional pass runs."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long) if isinstance(t, int) else t
        if guidance == 0:
            return model(x, t_batch, labels).float()
        null = torch.full_like(labels, null_label)
        eps = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null])).float()
        eps_c, eps_u = eps.chunk(2)
        return eps_c + guidance * (eps_c - eps_u)

    def _x0_from_eps(self, x, t, eps):
        ab = self.alphas_cumprod[t]
        return (x - (1 - ab).sqrt() * eps) / ab.sqrt()

    @torch.no_grad()
    def p_sample(self, model, x, t, labels, guidance, null_label, *, generator=None):
        """One step of Algorithm 2 (Ho et al.), with the predicted x0 clipped to [-1, 1] (not x_t)."""
        eps = self.predict_eps(model, x, t, labels, guidance, null_label)
        x0 = self._x0_from_eps(x, t, eps).clamp(-1, 1)
        mean = self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * x
        if t == 0:
            return mean, x0
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + (0.5 * self.posterior_log_variance_clipped[t]).exp() * noise, x0

    @torch.no_grad()
    def ddim_step(self, model, x, t, t_prev, labels, guidance, null_label, *, eta=0.0, generator=None):
        """x_t -> x_{t_prev} by eq. 12 of Song et al. 2021; t_prev = -1 means the final x0."""
        eps = self.predict_eps(model, x, t, labels, guidance, null_label)
        x0 = self._x0_from_eps(x, t, eps).clamp(-1, 1)
        if t_prev < 0:
            return x0, x0
        ab, ab_prev = self.alphas_cumprod[t], self.alphas_cumprod[t_prev]
        # the clipped x0 implies a matching eps, so that x_{t_prev} stays consistent with it
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x_prev, x0

    def ddim_timesteps(self, steps):
        if not 0 < steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps} (the model's T), got {steps}")
        # evenly spaced, always including the noisiest step T-1
        return torch.linspace(self.timesteps - 1, 0, steps).round().long().unique_consecutive().tolist()

    @torch.no_grad()
    def sample(self, model, labels, shape, *, sampler="ddim", steps=50, eta=0.0, guidance=0.0,
               guidance_interval=(0.0, 1.0), null_label=None, generator=None, num_frames=0, progress=None,
               callback=None):
        """Generate images for ``labels``; returns (x0, frames).

        frames is a list of ``num_frames`` snapshots of x_t from pure noise to the result, for the
        denoising-process figure (empty when num_frames is 0). ``generator`` makes it reproducible.
        ``guidance`` applies at the steps with lo <= t / T <= hi for ``guidance_interval`` (lo, hi).

        ``callback(step_index, num_steps, x0_estimate)``, when given, runs after each of the
        ``num_steps`` steps (step_index 0..num_steps-1) with that step's clipped estimate of the final
        image, (B, C, H, W) in [-1, 1]: a page can show the digit as it forms. It must not change the
        tensor in place; it changes nothing else, so the samples are the same with it as without, and
        the last estimate is the result. An exception it raises stops the sampling there (bench.py
        times the first steps of DDPM so).
        """
        lo, hi = guidance_interval
        device = self.betas.device
        null_label = model.num_classes if null_label is None else null_label
        x = torch.randn(shape, generator=generator, device=device)
        if sampler == "ddpm":
            ts = list(range(self.timesteps - 1, -1, -1))
        elif sampler == "ddim":
            ts = self.ddim_timesteps(steps)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
        keep = set()
        if num_frames > 1:
            keep = set(torch.linspace(0, len(ts) - 1, num_frames - 1).round().long().tolist())
        frames = [x.clone()] if num_frames > 0 else []
        for i, t in enumerate(progress(ts) if progress else ts):
            w = guidance if lo * self.timesteps <= t <= hi * self.timesteps else 0.0
            if sampler == "ddpm":
                x, x0 = self.p_sample(model, x, t, labels, w, null_label, generator=generator)
            else:
                t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                x, x0 = self.ddim_step(model, x, t, t_prev, labels, w, null_label, eta=eta, generator=generator)
            if callback is not None:
                callback(i, len(ts), x0)
            if i in keep:
                frames.append(x.clamp(-1, 1).clone())
        return x.clamp(-1, 1), frames


@torch.no_grad()
def generate(model, diffusion, labels, device, precision="fp32", cfg=None, *, seed=0, data_size=None, num_frames=0,
             progress=None, callback=None):
    """Sample one image per label in ``precision`` with ``cfg`` (a SampleConfig: sampler, steps, eta, guidance;
    the defaults when None) through ``Diffusion.sample``; returns (uint8 images (N, H, W), list of uint8 frames).
    ``callback`` is Diffusion.sample's: it sees each step's x0 estimate in the model's range, not uint8.

    A torch.Generator seeded with ``seed`` makes the result the same on every run; images are
    resized back to ``data_size`` (the data set's side) when the model works at another size."""
    cfg = cfg or SampleConfig()
    g = torch.Generator(device).manual_seed(seed)
    labels = labels.to(device)
    shape = (len(labels), model.cfg.in_channels, model.cfg.img_size, model.cfg.img_size)
    with autocast(device, precision):
        x, frames = diffusion.sample(model, labels, shape, sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta,
                                     guidance=cfg.guidance, guidance_interval=cfg.guidance_interval, generator=g,
                                     num_frames=num_frames, progress=progress, callback=callback)
    return to_uint8(x, data_size), [to_uint8(f, data_size) for f in frames]
