"""Samplers: small functions that turn noise into images, one per paper, looked up by name in ``SAMPLERS``.

    x0 = SAMPLERS[name](denoise, x, ts, sched, generator=g, eta=0.0, on_step=hook)

``denoise(x, t) -> x0`` is the model's estimate of the clean image at step ``t`` (guided and clipped to
[-1, 1]; diffusion.py builds it for the model's objective, so every sampler works with every
objective). ``x`` is the start (pure noise at ``ts[0]``), ``ts`` the steps visited, noisiest first,
``sched`` the Diffusion module (its ``alphas_cumprod`` and DDPM's posterior buffers). After step i,
``on_step(i, x, x0)`` sees the new x and that step's estimate x0.

In the papers' VP notation, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), and the half log-SNR
lambda_t = log(alpha_t / sigma_t). The last step always lands on the final estimate x0 (t = -1 below).

  ddpm      Ho et al. 2020, Algorithm 2: ancestral, one model evaluation for each of the T steps
  ddim      Song et al. 2021, eq. 12: deterministic with eta 0, one evaluation a step
  dpmpp-2m  Lu et al. 2022, "DPM-Solver++", the multistep second-order solver of the data-prediction ODE;
            one evaluation a step, a step of first order to start and to finish
  heun      Karras et al. 2022 (EDM), Algorithm 1: Heun's second-order method on the probability-flow ODE;
            two evaluations a step, the last step Euler (one)
  lcm       Song et al. 2023, "Consistency Models", Algorithm 1 (multistep consistency sampling), as Luo et al.
            2023 (LCM) sample: the consistency function's x0, fresh noise to the next step; one evaluation a
            step and no unconditional pass: the guidance scale is an input of a speed adapter (distill.py)
"""
from __future__ import annotations

import math

import torch

# Model evaluations per step and image, before guidance doubles them (heun's last step takes one)
EVALS_PER_STEP = {"ddpm": 1, "ddim": 1, "dpmpp-2m": 1, "heun": 2, "lcm": 1}
# Samplers whose network takes the guidance scale w as an input (a distilled consistency function) instead of
# running a second, unconditional pass
GUIDANCE_INPUT = ("lcm",)
# LCM's boundary condition (Luo et al. 2023, after Song et al. 2023, eq. 8 with sigma_data 0.5): f(x, t) =
# c_skip(t) x + c_out(t) x0_hat, c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2), so f is
# the identity at t = 0 and the network's x0 from the first steps up. s = 10 is LCM's timestep scaling.
CONSISTENCY_SIGMA_DATA, CONSISTENCY_T_SCALE = 0.5, 10.0


def _noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _eps_from_x0(x, x0, ab):
    """The noise that x0 implies: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, solved for eps."""
    return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def sample_ddpm(denoise, x, ts, sched, *, generator=None, on_step=None, **_):
    """Algorithm 2 of Ho et al.: the posterior q(x_{t-1} | x_t, x0) around the clipped estimate x0, plus noise."""
    x0 = x
    for i, t in enumerate(ts):
        x0 = denoise(x, t)
        mean = sched.posterior_mean_coef1[t] * x0 + sched.posterior_mean_coef2[t] * x
        x = mean if t == 0 else mean + (0.5 * sched.posterior_log_variance_clipped[t]).exp() * _noise_like(x, generator)
        if on_step:
            on_step(i, x, x0)
    return x  # at t = 0 the posterior mean is x0 itself (its second coefficient is 0)


def _walk(denoise, x, ts, step, on_step):
    """The loop the ODE samplers share: estimate x0 at each step, then ``step(x, x0, t, s)`` to the next step s;
    the last step lands on its estimate x0."""
    x0 = x
    for i, t in enumerate(ts):
        x0 = denoise(x, t)
        x = x0 if i + 1 == len(ts) else step(x, x0, t, ts[i + 1])
        if on_step:
            on_step(i, x, x0)
    return x


def sample_ddim(denoise, x, ts, sched, *, eta=0.0, generator=None, on_step=None, **_):
    """Eq. 12 of Song et al.: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - s^2) eps + s z, eps implied by the clipped x0."""
    ab_all = sched.alphas_cumprod

    def step(x, x0, t, s):
        ab, ab_prev = ab_all[t], ab_all[s]
        eps = _eps_from_x0(x, x0, ab)  # consistent with the clipped x0
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        return x + sigma * _noise_like(x, generator) if eta > 0 else x
    return _walk(denoise, x, ts, step, on_step)


def sample_dpmpp_2m(denoise, x, ts, sched, *, on_step=None, **_):
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022, in closed form on the discrete schedule.

    With h = lambda_s - lambda_t, a step t -> s is x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D,
    where D is x0 (first order, which is DDIM) or, from the second step on,
    (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1} with r = h_{i-1} / h_i. e^-h is computed as the ratio
    (alpha_t sigma_s) / (sigma_t alpha_s), which stays finite where abar_t = 0 (zero terminal SNR)."""
    ab_all = sched.alphas_cumprod
    prev = {}  # the previous step's x0 and h

    def step(x, x0, t, s):
        ab, ab_s = ab_all[t], ab_all[s]
        alpha_t, sigma_t, alpha_s, sigma_s = ab.sqrt(), (1 - ab).sqrt(), ab_s.sqrt(), (1 - ab_s).sqrt()
        exp_neg_h = alpha_t * sigma_s / (sigma_t * alpha_s)
        h = float(-torch.log(exp_neg_h)) if alpha_t > 0 else math.inf
        d = x0
        if prev and math.isfinite(prev["h"]):
            r = prev["h"] / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev["x0"]
        prev.update(x0=x0, h=h)
        return (sigma_s / sigma_t) * x - alpha_s * (exp_neg_h - 1) * d
    return _walk(denoise, x, ts, step, on_step)


def sample_heun(denoise, x, ts, sched, *, on_step=None, **_):
    """Algorithm 1 of Karras et al. 2022 with their sigma = sqrt((1 - abar) / abar) and x_hat = x / sqrt(abar).

    The ODE is dx_hat/dsigma = eps (the noise implied by x0); Euler gives x_hat' = x_hat + (sigma_s - sigma_t) eps,
    Heun averages eps at both ends. A step from abar = 0 (sigma infinite) is taken as DDIM's, which is its limit."""
    ab_all = sched.alphas_cumprod

    def step(x, x0, t, s):
        ab, ab_s = ab_all[t], ab_all[s]
        eps = _eps_from_x0(x, x0, ab)
        x_s = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps  # the Euler step (DDIM)
        if ab == 0:
            return x_s
        eps_s = _eps_from_x0(x_s, denoise(x_s, s), ab_s)
        sig, sig_s = ((1 - ab) / ab).sqrt(), ((1 - ab_s) / ab_s).sqrt()
        return ab_s.sqrt() * (x / ab.sqrt() + (sig_s - sig) * (eps + eps_s) / 2)
    return _walk(denoise, x, ts, step, on_step)


def consistency_scalings(t):
    """(c_skip, c_out) of LCM's boundary condition at integer steps ``t`` (a tensor), in float64 then as given."""
    st = CONSISTENCY_T_SCALE * t.double()
    sd2 = CONSISTENCY_SIGMA_DATA ** 2
    return sd2 / (st ** 2 + sd2), st / (st ** 2 + sd2).sqrt()


def sample_lcm(denoise, x, ts, sched, *, generator=None, on_step=None, **_):
    """Algorithm 1 of Song et al. 2023: x0 = f(x_t, t), then x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) z with fresh
    noise z; the last step returns its x0. ``denoise`` is the consistency function f (Diffusion.sample builds it)."""
    ab_all = sched.alphas_cumprod

    def step(x, x0, t, s):
        return ab_all[s].sqrt() * x0 + (1 - ab_all[s]).sqrt() * _noise_like(x0, generator)
    return _walk(denoise, x, ts, step, on_step)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp-2m": sample_dpmpp_2m, "heun": sample_heun,
            "lcm": sample_lcm}


def model_evals(sampler, steps, guided=True):
    """Network evaluations per image: each step's, with guidance's second (unconditional) half (none for a sampler
    whose network takes w as an input)."""
    guided = guided and sampler not in GUIDANCE_INPUT
    per_step = EVALS_PER_STEP[sampler]
    n = steps * per_step - (per_step - 1)  # the last step of a second-order method is first order
    return n * (2 if guided else 1)
