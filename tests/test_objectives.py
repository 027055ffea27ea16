"""Objectives and samplers against closed forms: the conversions are exact inverses, a perfect model has loss 0,
and each sampler, given the exact denoiser of a point mass or a Gaussian, lands on the data or its marginal."""
import math

import numpy as np
import pytest
import torch

from config import DiffusionConfig, SampleConfig
from diffusion import LOGNORMAL_MEAN, LOGNORMAL_STD, OBJECTIVES, Diffusion
from samplers import SAMPLERS, model_evals

ALL = ("eps", "v", "edm")


def test_the_settings_list_every_objective_and_sampler():
    assert DiffusionConfig.__dataclass_fields__["objective"].metadata["choices"] == tuple(OBJECTIVES)
    assert set(SampleConfig.__dataclass_fields__["sampler"].metadata["choices"]) == set(SAMPLERS)


@pytest.mark.parametrize("name", ALL)
def test_target_and_x0_are_exact_inverses_in_float64(name):
    """F = target(x0, eps) at x_t = sqrt(ab) x0 + sqrt(1 - ab) eps gives back x0, across the whole schedule."""
    obj = OBJECTIVES[name]
    g = torch.Generator().manual_seed(0)
    ab = torch.cat([torch.tensor([1 - 1e-4, 0.9, 0.5, 0.1, 1e-3, 4e-5]),
                    Diffusion().alphas_cumprod.double()[::97]]).double().view(-1, 1, 1, 1)
    x0 = torch.rand((len(ab), 1, 6, 6), generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn((len(ab), 1, 6, 6), generator=g, dtype=torch.float64)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    f = obj.target(x0, eps, ab)
    torch.testing.assert_close(obj.to_x0(f, x, ab), x0, rtol=0, atol=1e-9)
    # and the loss on F is x0_scale(snr) times the loss on x0: a shift d of F moves x0 by d / sqrt(x0_scale)
    snr = ab / (1 - ab)
    moved = obj.to_x0(f + 1e-3, x, ab) - x0
    torch.testing.assert_close(moved.abs() * obj.x0_scale(snr).sqrt(), torch.full_like(moved, 1e-3), rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("name", ("v", "edm"))
def test_x0_is_defined_at_zero_terminal_snr(name):
    """At abar = 0 (pure noise) v and EDM still name x0; F = target recovers it (eps cannot: it is refused)."""
    obj = OBJECTIVES[name]
    ab = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    x0, eps = torch.full((1, 1, 2, 2), 0.3, dtype=torch.float64), torch.randn(1, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(obj.to_x0(obj.target(x0, eps, ab), eps, ab), x0)


def test_edm_with_sigma_data_one_is_v_prediction():
    """EDM's preconditioning at sigma_data = 1 has c_in = 1, c_skip x_hat = sqrt(ab) x, c_out = sqrt(1 - ab): F = -v."""
    import diffusion
    ab = torch.linspace(0.01, 0.99, 7, dtype=torch.float64).view(-1, 1, 1, 1)
    x0, eps = torch.rand(7, 1, 3, 3, dtype=torch.float64), torch.randn(7, 1, 3, 3, dtype=torch.float64)
    old = diffusion.SIGMA_DATA
    try:
        diffusion.SIGMA_DATA = 1.0
        f = OBJECTIVES["edm"].target(x0, eps, ab)
    finally:
        diffusion.SIGMA_DATA = old
    torch.testing.assert_close(f, -OBJECTIVES["v"].target(x0, eps, ab))


class Oracle(torch.nn.Module):
    """A 'network' that returns the objective's true target for the batch it was told about."""

    def __init__(self, d, x0, noise, t):
        super().__init__()
        self.d, self.x0, self.noise, self.t = d, x0, noise, t

    def forward(self, x, t, labels):
        assert torch.equal(t, self.t)
        ab = self.d.alphas_cumprod[t].view(-1, 1, 1, 1)
        return self.d._obj.target(self.x0, self.noise, ab)


@pytest.mark.parametrize("bounded", (False, True))
@pytest.mark.parametrize("gamma", (0.0, 5.0))
@pytest.mark.parametrize("name,ztsnr", [("eps", False), ("v", False), ("edm", False), ("v", True), ("edm", True)])
def test_a_model_that_returns_the_true_target_has_loss_zero(name, ztsnr, gamma, bounded):
    d = Diffusion(timesteps=100, objective=name, zero_terminal_snr=ztsnr, min_snr_gamma=gamma, bounded_loss=bounded)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((8, 1, 5, 5), generator=g) * 2 - 1
    noise = torch.randn((8, 1, 5, 5), generator=g)
    t = torch.tensor([0, 1, 10, 50, 90, 98, 99, 30])
    assert d.loss(Oracle(d, x0, noise, t), x0, torch.zeros(8, dtype=torch.long), t, noise).item() < 1e-10
    wrong = Oracle(d, x0, noise + 0.1, t)  # a model off by a little is not at 0
    assert d.loss(wrong, x0, torch.zeros(8, dtype=torch.long), t, noise).item() > 1e-6


class Shifted(torch.nn.Module):
    """A 'network' whose output implies x0 + d at the x_t of (x0, noise, t): the target of x0 + d under the noise
    that keeps x_t where it is."""

    def __init__(self, d, x0, noise, shift):
        super().__init__()
        self.d, self.x0, self.noise, self.shift = d, x0, noise, shift

    def forward(self, x, t, labels):
        ab = self.d.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = self.noise - ab.sqrt() * self.shift / (1 - ab).sqrt()
        return self.d._obj.target(self.x0 + self.shift, noise, ab)


@pytest.mark.parametrize("name", ALL)
def test_bounded_loss_forgives_only_the_far_side_of_an_end_of_the_range(name):
    # six pixels: background pushed below black (forgiven), background pushed up (counted), full ink pushed past
    # white (forgiven), mid grey either way and a near-black pixel pushed past -1 (counted: its data is not -1),
    # full ink pushed down (counted)
    x0 = torch.tensor([-1.0, -1.0, 1.0, 0.3, -0.9, 1.0]).view(1, 1, 2, 3).repeat(4, 1, 1, 1)
    shift = torch.tensor([-0.2, 0.1, 0.3, -0.4, -0.5, -0.1]).view(1, 1, 2, 3).repeat(4, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 10, 40, 80])
    labels = torch.zeros(4, dtype=torch.long)
    forgiven, counted = 0.04 + 0.09, 0.01 + 0.16 + 0.25 + 0.01  # the squared shifts
    for bounded, kept in ((True, counted / 6), (False, (forgiven + counted) / 6)):
        d = Diffusion(timesteps=100, objective=name, min_snr_gamma=5.0, bounded_loss=bounded).double()
        loss = d.loss(Shifted(d, x0.double(), noise.double(), shift.double()), x0.double(), labels, t, noise.double())
        # per pixel the weight min(SNR, 5) / x0_scale times x0_scale d^2 (the error on F): min(SNR, 5) d^2
        assert loss.item() == pytest.approx((d.snr[t].clamp(max=5.0) * kept).mean().item(), rel=1e-5)


def test_bounded_loss_keeps_the_gradient_of_a_pixel_past_the_range_whose_data_is_inside():
    # data -0.9 estimated at -1.4: the sampler's clip would give -1, not the data, so the loss must pull it back
    d = Diffusion(timesteps=100, objective="v", bounded_loss=True)
    x0 = torch.tensor([-1.0, -0.9]).view(1, 1, 1, 2)
    noise = torch.zeros_like(x0)
    out = Shifted(d, x0, noise, torch.tensor([-0.5, -0.5]).view(1, 1, 1, 2))(None, torch.tensor([50]), None)
    out.requires_grad_(True)
    d.loss(lambda x, t, labels: out, x0, torch.zeros(1, dtype=torch.long), torch.tensor([50]), noise).backward()
    assert out.grad[0, 0, 0, 0] == 0 and out.grad[0, 0, 0, 1].abs() > 1e-3


def test_min_snr_weight_is_min_snr_gamma_over_the_objectives_x0_scale():
    t = torch.tensor([0, 100, 500, 999])
    for name, scale in (("eps", lambda s: s), ("v", lambda s: s + 1), ("edm", lambda s: s + 4)):
        d = Diffusion(objective=name, min_snr_gamma=5.0)
        snr = d.snr[t]
        torch.testing.assert_close(d.loss_weight(t), snr.clamp(max=5.0) / scale(snr))


def test_zero_terminal_snr_keeps_the_first_step_and_ends_in_pure_noise():
    d, plain = Diffusion(objective="v", zero_terminal_snr=True), Diffusion()
    assert d.alphas_cumprod[-1].item() == 0.0
    assert d.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    with pytest.raises(ValueError, match="needs objective v or edm"):
        Diffusion(objective="eps", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="pass --objective v"):
        DiffusionConfig(objective="eps", zero_terminal_snr=True)


def test_lognormal_t_follows_edms_sigma_distribution_and_its_generator():
    d = Diffusion(t_sampling="lognormal")
    t = d.draw_t(50000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    log_sigma = d.log_sigma[t].double()
    # snapped to the grid of steps, and clipped at the schedule's ends (sigma 0.01 .. 157), which N(-1.2, 1.2)
    # reaches below 0.01 a few times in ten thousand
    assert log_sigma.mean().item() == pytest.approx(LOGNORMAL_MEAN, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(LOGNORMAL_STD, abs=0.03)
    assert torch.equal(t, d.draw_t(50000, torch.Generator().manual_seed(0)))
    assert d.draw_t(1000, torch.Generator().manual_seed(0), 200, 800).min() >= 200
    uniform = Diffusion().draw_t(1000, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------ samplers against exact denoisers

def point_mass_denoiser(c):
    return lambda x, t: torch.full_like(x, c)


def gaussian_denoiser(sched, mu, s):
    """E[x0 | x_t] for x0 ~ N(mu, s^2) per pixel: mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu)."""
    def denoise(x, t):
        ab = sched.alphas_cumprod[t].double()
        return (mu + ab.sqrt() * s ** 2 / (ab * s ** 2 + 1 - ab) * (x - ab.sqrt() * mu)).clamp(-1, 1)
    return denoise


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_sampler_lands_on_a_point_mass(sampler):
    d = Diffusion(timesteps=200).double()
    ts = d.sample_timesteps(sampler, 10)
    x = torch.randn((4, 1, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = SAMPLERS[sampler](point_mass_denoiser(0.37), x, ts, d, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler,steps", [("ddim", 200), ("dpmpp-2m", 40), ("heun", 40), ("ddpm", 0)])
@pytest.mark.parametrize("ztsnr", (False, True))
def test_each_sampler_reaches_a_gaussians_marginal(sampler, steps, ztsnr):
    """x0 ~ N(0.2, 0.3^2): from pure noise, the sampler's outputs have that mean and spread (within the steps'
    discretisation error: each converges to std 0.302 and mean 0.194 as its steps grow)."""
    d = Diffusion(objective="v", zero_terminal_snr=ztsnr).double()
    ts = d.sample_timesteps(sampler, steps)
    x = torch.randn((20000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = SAMPLERS[sampler](gaussian_denoiser(d, 0.2, 0.3), x, ts, d, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(0.2, abs=0.01)
    assert out.std().item() == pytest.approx(0.3, rel=0.04)


def test_dpm_solver_and_ddim_agree_at_a_thousand_steps():
    """Both solve the same ODE: at T steps they land on the same points, sample for sample (and Heun too)."""
    d = Diffusion().double()
    x = torch.randn((2000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = gaussian_denoiser(d, -0.1, 0.4)
    ts = d.sample_timesteps("ddim", 1000)
    assert all(d.sample_timesteps(s, 1000) == ts for s in SAMPLERS)
    ddim, dpm, heun = (SAMPLERS[s](den, x, ts, d) for s in ("ddim", "dpmpp-2m", "heun"))
    for other in (dpm, heun):
        assert (ddim - other).abs().mean().item() < 2e-3 and (ddim - other).abs().max().item() < 5e-3  # DDIM: O(1/T)
    # and at 10 steps on their own grids the second-order ones are far nearer that answer than DDIM
    err = {s: (SAMPLERS[s](den, x, d.sample_timesteps(s, 10), d) - ddim).abs().mean().item()
           for s in ("ddim", "dpmpp-2m", "heun")}
    assert err["dpmpp-2m"] < err["ddim"] / 5 and err["heun"] < err["ddim"]


@pytest.mark.parametrize("ztsnr", (False, True))
def test_logsnr_steps_are_even_in_log_sigma_and_start_at_the_noisiest(ztsnr):
    d = Diffusion(objective="v", zero_terminal_snr=ztsnr)
    ts = d.logsnr_timesteps(10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    gaps = (d.log_sigma[ts[1:]] - d.log_sigma[ts[:-1]]).abs()[1 if ztsnr else 0:]
    assert gaps.max() / gaps.min() < 1.2  # even, up to snapping to the grid


def test_model_evaluations_count_guidance_and_second_order_steps():
    assert model_evals("ddim", 50) == 100
    assert model_evals("dpmpp-2m", 10) == 20
    assert model_evals("heun", 10) == 38  # 2 a step, the last Euler
    assert model_evals("ddim", 50, guided=False) == 50


@pytest.mark.parametrize("name", ALL)
def test_sampling_a_tiny_model_under_each_objective(name):
    """The whole path (c_in, guidance on F, x0 from F, a sampler) runs and stays in range for every objective."""
    from config import ModelConfig, preset_config
    from unet import UNet
    torch.manual_seed(0)
    model = UNet(preset_config(ModelConfig, "tiny")).eval()
    d = Diffusion(timesteps=50, objective=name)
    for sampler in SAMPLERS:
        x, _ = d.sample(model, torch.arange(3), (3, 1, 28, 28), sampler=sampler, steps=4, guidance=2.0,
                        generator=torch.Generator().manual_seed(0))
        assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all() and x.abs().max() <= 1
        assert not math.isclose(x.std().item(), 0.0)


def test_a_checkpoint_saved_before_the_objective_existed_reads_as_eps():
    """Such checkpoints predicted the noise at uniform t on the plain schedule; a missing key says so, whatever
    today's default is."""
    import dataclasses
    from config import from_saved
    new = ("objective", "t_sampling", "zero_terminal_snr", "bounded_loss")
    saved = {k: v for k, v in dataclasses.asdict(DiffusionConfig()).items() if k not in new}
    cfg = from_saved(DiffusionConfig, saved)
    assert (cfg.objective, cfg.t_sampling, cfg.zero_terminal_snr, cfg.bounded_loss) == ("eps", "uniform", False, False)
    assert from_saved(DiffusionConfig, {**saved, "objective": "v"}).objective == "v"


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_image_to_image_at_strength_0_and_1(sampler):
    """SDEdit's two ends: strength 0 returns the input, strength 1 is plain sampling from the same noise; between,
    the result keeps more of the input the lower the strength."""
    from config import ModelConfig, preset_config
    from unet import UNet
    torch.manual_seed(0)
    model = UNet(preset_config(ModelConfig, "tiny")).eval()
    d = Diffusion(timesteps=50)
    init = torch.rand((3, 1, 28, 28), generator=torch.Generator().manual_seed(3)) * 2 - 1

    def run(**kw):
        return d.sample(model, torch.arange(3), (3, 1, 28, 28), sampler=sampler, steps=5, guidance=2.0,
                        generator=torch.Generator().manual_seed(0), **kw)[0]
    assert torch.equal(run(init=init, strength=0.0), init)
    assert torch.equal(run(init=init, strength=1.0), run())
    near, far = ((run(init=init, strength=s) - init).abs().mean() for s in (0.3, 0.9))
    assert near < far
    with pytest.raises(ValueError, match="strength must be in"):
        run(init=init, strength=-0.5)


# ------------------------------------------------------------------ the consistency sampler (lcm)

class ExactPointMass(torch.nn.Module):
    """The exact network for data that is one image c: its output implies x0 = c at every x_t, under ``objective``.
    It records each call's w (a speed adapter's input), and has a w_embed so Diffusion.sample passes w."""

    def __init__(self, d, c):
        super().__init__()
        self.d, self.c, self.num_classes, self.ws = d, c, 10, []
        self.w_embed = torch.nn.Identity()

    def forward(self, x, t, labels, w=None):
        self.ws.append(w)
        ab = self.d.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_in = x
        if self.d._obj.in_scale is not None:  # Diffusion scaled x_t by c_in first: undo it
            x_in = x / self.d._obj.in_scale(ab)
        x0 = torch.full_like(x, self.c)
        eps = (x_in - ab.sqrt() * x0) / (1 - ab).sqrt()
        return self.d._obj.target(x0, eps, ab)


@pytest.mark.parametrize("objective", ALL)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_with_an_exact_consistency_function_lands_on_the_data(objective, steps):
    """From pure noise to the data in one step (and stays there over 2, 4, 8), one network call a step, w the
    network's input and no unconditional pass."""
    d = Diffusion(objective=objective)
    model = ExactPointMass(d, 0.37)
    x, _ = d.sample(model, torch.arange(3), (3, 1, 5, 5), sampler="lcm", steps=steps, guidance=1.5,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, torch.full_like(x, 0.37), rtol=0, atol=1e-4)
    assert len(model.ws) == steps == model_evals("lcm", steps)
    assert all(w.tolist() == [1.5] * 3 for w in model.ws)


def test_lcm_steps_are_lcms_skipping_grid():
    """LCM's scheduler on 1,000 steps: 999, 759, 499, 259 for 4; the distillation trains on the same grid."""
    d = Diffusion()
    assert d.lcm_timesteps(4) == [999, 759, 499, 259]
    assert d.lcm_timesteps(1) == [999] and d.lcm_timesteps(2) == [999, 499]
    assert len(d.lcm_timesteps(8)) == 8 and set(d.lcm_timesteps(8)) <= set(d.skip_grid())
    assert d.skip_grid()[:2] == [19, 39] and len(d.skip_grid()) == 50
    assert Diffusion(timesteps=20).skip_grid() == list(range(20))  # fewer steps than the grid: every one


def test_the_consistency_boundary_condition():
    """f(x, 0) = x exactly (c_skip 1, c_out 0); from the grid's first step up f is the network's x0."""
    from samplers import consistency_scalings
    c_skip, c_out = consistency_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-4 and c_out[1] > 0.9999 and c_skip[2] < 1e-8


def test_dynamic_thresholding_against_its_formula():
    """Saharia et al.'s rule, by numpy: s = the p-th quantile of |x0| per image (at least 1), clip to [-s, s], / s.
    An image inside [-1, 1] is unchanged; p = 0 is static clipping; the other image's scale does not leak in."""
    from diffusion import clip_x0

    wide = torch.linspace(-3.0, 2.0, 64, dtype=torch.float64).view(1, 1, 8, 8)
    inside = torch.linspace(-1.0, 0.9, 64, dtype=torch.float64).view(1, 1, 8, 8)
    x0 = torch.cat([wide, inside])
    for p in (0.5, 0.9, 0.995):
        out = clip_x0(x0, p)
        s = max(1.0, float(np.quantile(np.abs(wide.numpy()), p)))
        assert torch.allclose(out[0], torch.from_numpy(np.clip(wide[0].numpy(), -s, s) / s), atol=1e-12)
        assert torch.equal(out[1], inside[0]) and out.abs().max() <= 1.0
    assert torch.equal(clip_x0(x0, 0.0), x0.clamp(-1, 1))
    assert clip_x0(x0, 0.5)[0].abs().max() == 1.0 and (clip_x0(x0, 0.5)[0].abs() == 1).sum() > 1  # p 0.5: s ~ 1.5


def test_projected_guidance_against_its_formula():
    """Sadat et al.'s split, by numpy, per image: d = x0_c - x0_u; d_par = (<d, a> / <a, a>) a with a = x0_c + 1
    (black at 0); result x0_c + w (d - d_par + p d_par). p 1 is plain guidance; p 0 leaves a push orthogonal to a;
    one image's numbers do not leak into the other's; an all-black conditional image has no parallel part."""
    from diffusion import project_guidance

    g = torch.Generator().manual_seed(0)
    x0_c = torch.rand(3, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    x0_c[2] = -1.0  # all black
    x0_u = torch.rand(3, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    w = 1.75
    for p in (0.0, 0.5, 1.0):
        out = project_guidance(x0_c, x0_u, w, p)
        for i in range(3):
            c, u = x0_c[i].numpy().ravel(), x0_u[i].numpy().ravel()
            d, a = c - u, c + 1
            par = (d @ a) / (a @ a) * a if (a @ a) > 0 else np.zeros_like(a)
            expected = c + w * (d - par + p * par)
            assert np.allclose(out[i].numpy().ravel(), expected, atol=1e-12, rtol=0)
        assert torch.isfinite(out).all()
    assert torch.allclose(project_guidance(x0_c, x0_u, w, 1.0), x0_c + w * (x0_c - x0_u), atol=1e-12, rtol=0)
    push = (project_guidance(x0_c, x0_u, w, 0.0) - x0_c).flatten(1)
    assert (push * (x0_c + 1).flatten(1)).sum(1).abs().max() < 1e-12  # orthogonal to a
    assert push[:2].abs().max() > 0.1  # and not nothing
    assert torch.equal(project_guidance(x0_c[2:], x0_u[2:], w, 0.0), x0_c[2:] + w * (x0_c[2:] - x0_u[2:]))
    assert torch.equal(project_guidance(x0_c[:1], x0_u[:1], w, 0.3), project_guidance(x0_c, x0_u, w, 0.3)[:1])


def test_sampling_with_projected_guidance():
    """guidance_parallel 1 samples exactly as plain guidance did; below 1 the step's estimate is project_guidance
    of the conditional and unconditional estimates; guidance 0 runs the conditional half alone either way."""
    from config import ModelConfig, preset_config
    from diffusion import project_guidance
    from unet import UNet

    torch.manual_seed(0)
    tiny_model = UNet(preset_config(ModelConfig, "tiny")).eval()

    diffusion = Diffusion.from_config(preset_config(DiffusionConfig, "tiny"))
    labels = torch.tensor([2, 8])

    def run(**kw):
        return diffusion.sample(tiny_model, labels, (2, 1, 28, 28), sampler="dpmpp-2m", steps=4,
                                generator=torch.Generator().manual_seed(3), **kw)[0]
    assert torch.equal(run(guidance=2.0), run(guidance=2.0, guidance_parallel=1.0))
    assert not torch.equal(run(guidance=2.0), run(guidance=2.0, guidance_parallel=0.5))
    assert torch.equal(run(guidance=0.0), run(guidance=0.0, guidance_parallel=0.0))

    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t, null = 30, tiny_model.num_classes
    tb = torch.full((2,), t)
    with torch.no_grad():
        x0_c = diffusion.to_x0(diffusion.model_output(tiny_model, x, tb, labels).float(), x, t)
        x0_u = diffusion.to_x0(diffusion.model_output(tiny_model, x, tb, torch.full_like(labels, null)).float(), x, t)
        got = diffusion.guided_x0(tiny_model, x, t, labels, 1.5, null, 0.25)
    assert torch.allclose(got, project_guidance(x0_c, x0_u, 1.5, 0.25), atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_guidance_parallel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="guidance_parallel"):
        SampleConfig(guidance_parallel=bad)


def test_the_tutorial_preset_guides_plainly():
    """The tutorial samples with DDIM-50 and classifier-free guidance as Ho & Salimans wrote it: no projection."""
    from config import preset_config

    cfg = preset_config(SampleConfig, "tutorial")
    assert (cfg.sampler, cfg.steps, cfg.guidance_parallel) == ("ddim", 50, 1.0)
    assert preset_config(SampleConfig, "fast").guidance_parallel < 1
