"""Diffusion: the schedule, q_sample and the Min-SNR weight against closed forms, and both samplers."""
import numpy as np
import pytest
import torch

from config import DiffusionConfig, ModelConfig, SampleConfig, preset_config
from diffusion import Diffusion
from unet import UNet

T_TINY = preset_config(DiffusionConfig, "tiny").timesteps


def reference_alphas_cumprod(timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """abar_t = prod_{s<=t} (1 - beta_s) in float64, written out independently of diffusion.py."""
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return UNet(preset_config(ModelConfig, "tiny")).eval()


@pytest.fixture(scope="module")
def tiny_diffusion():
    return Diffusion.from_config(preset_config(DiffusionConfig, "tiny"))


class CountingModel(torch.nn.Module):
    """Wraps a UNet and records (batch size, t, labels) of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.calls = []

    def forward(self, x, t, labels):
        self.calls.append((x.shape[0], t.clone(), labels.clone()))
        return self.model(x, t, labels)


# ------------------------------------------------------------------ schedule

def test_schedule_invariants():
    d = Diffusion()
    betas, ab = d.betas, d.alphas_cumprod
    assert betas.shape == ab.shape == (1000,)
    assert torch.all(betas[1:] > betas[:-1])
    assert betas.min().item() >= 1e-4 * (1 - 1e-6) and betas.max().item() <= 0.02 * (1 + 1e-6)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-6) and betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    assert torch.all(ab[1:] < ab[:-1])
    assert torch.all((ab > 0) & (ab < 1))
    np.testing.assert_allclose(ab.numpy(), reference_alphas_cumprod(), rtol=1e-6)
    # posterior variance of Ho et al. eq. 7 is 0 at t=0 and below beta_t elsewhere
    assert d.posterior_variance[0].item() == 0.0
    assert torch.all(d.posterior_variance[1:] > 0) and torch.all(d.posterior_variance <= betas)


def test_cosine_schedule_matches_nichol_dhariwal_closed_form():
    """abar(t) = f(t) / f(0) with f(t) = cos^2((t/T + s) / (1 + s) pi/2), s = 0.008 (their eq. 17), written
    out here independently; the betas are clipped at 0.999, which only the last step reaches."""
    T, s = 1000, 0.008
    d = Diffusion(timesteps=T, schedule="cosine")
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    ab = f[1:] / f[0]
    np.testing.assert_allclose(d.alphas_cumprod[:-1].double().numpy(), ab[:-1], rtol=1e-5)
    assert d.betas.max().item() == pytest.approx(0.999) and (d.betas[:-1] < 0.999).all()
    # it keeps more signal than the linear schedule in the middle: abar(T/2) 0.49 against 0.078
    assert d.alphas_cumprod[500].item() == pytest.approx(0.4923, abs=1e-3)
    assert Diffusion().alphas_cumprod[500].item() == pytest.approx(0.0778, abs=1e-3)
    assert Diffusion.from_config(DiffusionConfig(schedule="cosine")).alphas_cumprod.equal(d.alphas_cumprod)


def test_a_config_without_a_schedule_is_linear():
    """Checkpoints written before the schedule was a setting hold no such key; they were trained linear."""
    saved = {k: v for k, v in vars(DiffusionConfig()).items() if k != "schedule"}
    assert DiffusionConfig(**saved).schedule == "linear"
    with pytest.raises(ValueError, match="schedule must be one of linear, cosine"):
        DiffusionConfig(schedule="quadratic")


def test_schedule_buffers_are_float32_and_move_with_to():
    d = Diffusion(timesteps=T_TINY)
    names = dict(d.named_buffers())
    assert {"betas", "alphas_cumprod", "sqrt_alphas_cumprod", "snr"} <= set(names)
    assert all(b.dtype == torch.float32 for b in names.values())
    d64 = Diffusion(timesteps=T_TINY).to(torch.float64)
    assert all(b.dtype == torch.float64 for b in d64.buffers())
    meta = Diffusion(timesteps=T_TINY).to("meta")
    assert all(b.device.type == "meta" for b in meta.buffers())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_schedule_and_sampling_on_cuda(tiny_model):
    d = Diffusion(timesteps=T_TINY).to("cuda")
    assert all(b.device.type == "cuda" for b in d.buffers())
    model = UNet(tiny_model.cfg).to("cuda").eval()
    model.load_state_dict(tiny_model.state_dict())
    g = torch.Generator("cuda").manual_seed(0)
    x, _ = d.sample(model, torch.arange(3, device="cuda"), (3, 1, 28, 28), steps=3, guidance=1.0, generator=g)
    assert x.device.type == "cuda" and x.shape == (3, 1, 28, 28)


def test_bad_diffusion_config_rejected():
    with pytest.raises(ValueError, match="beta_start"):
        DiffusionConfig(beta_start=0.03, beta_end=0.02)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionConfig(min_snr_gamma=-1)


# ------------------------------------------------------------------ q_sample, loss

def test_q_sample_matches_closed_form_in_float64():
    d = Diffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((6, 1, 28, 28), generator=g) * 2 - 1
    noise = torch.randn((6, 1, 28, 28), generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    ab = reference_alphas_cumprod()[t.numpy()].reshape(-1, 1, 1, 1)
    expected = np.sqrt(ab) * x0.double().numpy() + np.sqrt(1 - ab) * noise.double().numpy()
    x_t = d.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float32 and x_t.shape == x0.shape
    np.testing.assert_allclose(x_t.double().numpy(), expected, atol=1e-6, rtol=0)
    # t=0 is almost clean, t=T-1 almost pure noise
    assert torch.allclose(x_t[0], x0[0], atol=0.05)
    assert torch.allclose(x_t[-1], noise[-1], atol=0.05)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight_is_min_snr_gamma_over_snr(gamma):
    d = Diffusion(min_snr_gamma=gamma, objective="eps")  # Hang et al.'s weight for the noise objective
    t = torch.arange(0, 1000, 7)
    ab = reference_alphas_cumprod()[t.numpy()]
    snr = ab / (1 - ab)
    expected = np.minimum(snr, gamma) / snr
    w = d.loss_weight(t)
    np.testing.assert_allclose(w.double().numpy(), expected, rtol=1e-5)
    assert w.min().item() < 0.1 and w.max().item() == pytest.approx(1.0)  # low-noise steps are down-weighted


def test_min_snr_weight_is_one_when_gamma_is_zero():
    t = torch.arange(1000)
    w = Diffusion(min_snr_gamma=0.0).loss_weight(t)
    assert w.dtype == torch.float32 and torch.equal(w, torch.ones(1000))


def test_loss_is_weighted_per_sample_mse():
    d = Diffusion(min_snr_gamma=5.0, objective="eps")
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand((4, 1, 28, 28), generator=g) * 2 - 1
    noise = torch.randn((4, 1, 28, 28), generator=g)
    t = torch.tensor([0, 3, 300, 900])
    zero_model = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731  predicts eps = 0: the loss is E[w eps^2]
    ab = reference_alphas_cumprod()[t.numpy()]
    w = np.minimum(ab / (1 - ab), 5.0) / (ab / (1 - ab))
    expected = float(np.mean(w * noise.double().pow(2).mean(dim=(1, 2, 3)).numpy()))
    loss = d.loss(zero_model, x0, torch.zeros(4, dtype=torch.long), t, noise)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ guidance

def test_guided_eps_is_one_batched_forward_with_the_cfg_formula(tiny_model, tiny_diffusion):
    x = torch.randn(3, 1, 28, 28)
    labels = torch.tensor([1, 4, 7])
    counting = CountingModel(tiny_model)
    with torch.no_grad():
        eps = tiny_diffusion.guided_output(counting, x, 20, labels, 2.0, 10)
        t = torch.full((3,), 20)
        eps_c = tiny_model(x, t, labels)
        eps_u = tiny_model(x, t, torch.full((3,), 10))
    assert len(counting.calls) == 1
    batch, t_seen, labels_seen = counting.calls[0]
    assert batch == 6 and torch.equal(t_seen, torch.full((6,), 20))
    assert torch.equal(labels_seen, torch.tensor([1, 4, 7, 10, 10, 10]))  # conditional half, then null labels
    torch.testing.assert_close(eps, eps_c + 2.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ samplers

@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_shape_range_and_seeded_reproducibility(tiny_model, tiny_diffusion, sampler):
    labels = torch.arange(4)
    shape = (4, 1, 28, 28)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return tiny_diffusion.sample(tiny_model, labels, shape, sampler=sampler, steps=5, eta=0.5, guidance=1.5,
                                     generator=g)[0]

    a, b, c = run(0), run(0), run(1)
    assert a.shape == shape and a.dtype == torch.float32
    assert a.min().item() >= -1 and a.max().item() <= 1
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 0.1


@pytest.mark.parametrize("sampler,guidance", [("ddim", 2.0), ("ddpm", 2.0), ("ddim", 0.0)])
def test_sampler_calls_model_once_per_step(tiny_model, tiny_diffusion, sampler, guidance):
    counting = CountingModel(tiny_model)
    labels = torch.tensor([3, 5])
    tiny_diffusion.sample(counting, labels, (2, 1, 28, 28), sampler=sampler, steps=5, guidance=guidance,
                          generator=torch.Generator().manual_seed(0))
    expected_ts = tiny_diffusion.ddim_timesteps(5) if sampler == "ddim" else list(range(T_TINY - 1, -1, -1))
    assert len(counting.calls) == len(expected_ts) == (5 if sampler == "ddim" else T_TINY)
    batch = 4 if guidance > 0 else 2
    for (b, t, _), t_expected in zip(counting.calls, expected_ts):
        assert b == batch
        assert torch.equal(t, torch.full((batch,), t_expected))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_interval_guides_only_the_steps_inside_it(tiny_model, tiny_diffusion, sampler):
    """Inside lo <= t/T <= hi one batched forward of 2B (guided); outside it B (conditional only)."""
    counting = CountingModel(tiny_model)
    lo, hi = 0.3, 0.8
    tiny_diffusion.sample(counting, torch.tensor([3, 5]), (2, 1, 28, 28), sampler=sampler, steps=10, guidance=2.0,
                          guidance_interval=(lo, hi), generator=torch.Generator().manual_seed(0))
    ts = [t[0].item() for _, t, _ in counting.calls]
    sizes = [b for b, _, _ in counting.calls]
    inside = [lo * T_TINY <= t <= hi * T_TINY for t in ts]
    assert any(inside) and not all(inside)
    assert sizes == [4 if i else 2 for i in inside]


def test_full_guidance_interval_is_plain_guidance(tiny_model, tiny_diffusion):
    def run(**kw):
        return tiny_diffusion.sample(tiny_model, torch.tensor([1, 7]), (2, 1, 28, 28), steps=5, guidance=2.0,
                                     generator=torch.Generator().manual_seed(4), **kw)[0]
    assert torch.equal(run(), run(guidance_interval=(0.0, 1.0)))
    assert not torch.equal(run(), run(guidance_interval=(0.5, 1.0)))


@pytest.mark.parametrize("bad", [(0.5, 0.2), (-0.1, 1.0), (0.0, 1.5), (0.2,)])
def test_bad_guidance_interval_rejected(bad):
    with pytest.raises(ValueError, match=r"guidance_interval must be .*got"):  # the field, the rule, the value
        SampleConfig(guidance_interval=bad)


def test_ddim_timesteps():
    d = Diffusion(timesteps=T_TINY)
    ts = d.ddim_timesteps(5)
    assert len(ts) == 5 and ts[0] == T_TINY - 1 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert d.ddim_timesteps(T_TINY) == list(range(T_TINY - 1, -1, -1))
    assert d.ddim_timesteps(1) == [T_TINY - 1]


@pytest.mark.parametrize("steps", [0, T_TINY + 1])
def test_ddim_steps_out_of_range_raise(tiny_model, tiny_diffusion, steps):
    with pytest.raises(ValueError, match=rf"steps must be in 1\.\.{T_TINY}.*got {steps}"):
        tiny_diffusion.sample(tiny_model, torch.arange(2), (2, 1, 28, 28), sampler="ddim", steps=steps)


def test_unknown_sampler_raises(tiny_model, tiny_diffusion):
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        tiny_diffusion.sample(tiny_model, torch.arange(2), (2, 1, 28, 28), sampler="euler")


def test_sample_frames_run_from_the_noise_to_the_result(tiny_model, tiny_diffusion):
    shape = (2, 1, 28, 28)
    x, frames = tiny_diffusion.sample(tiny_model, torch.arange(2), shape, steps=5, num_frames=4,
                                      generator=torch.Generator().manual_seed(3))
    assert len(frames) == 4
    assert torch.equal(frames[0], torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(frames[-1], x)
    _, none = tiny_diffusion.sample(tiny_model, torch.arange(2), shape, steps=2, num_frames=0)
    assert none == []


# ------------------------------------------------------------------ callback

@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_callback_sees_every_step_and_changes_nothing(tiny_model, tiny_diffusion, sampler, eta):
    """The callback gets (i, num_steps, x0 estimate) once per step; the samples are the same to the bit with it as
    without, and the last estimate is the result (DDIM's last step returns x0; DDPM's at t=0 is x0 exactly)."""
    labels, shape = torch.tensor([2, 7, 9]), (3, 1, 28, 28)
    seen = []

    def run(**kw):
        return tiny_diffusion.sample(tiny_model, labels, shape, sampler=sampler, steps=6, eta=eta, guidance=1.5,
                                     guidance_interval=(0.2, 0.9), generator=torch.Generator().manual_seed(5),
                                     num_frames=3, **kw)

    plain, plain_frames = run()
    x, frames = run(callback=lambda i, n, x0: seen.append((i, n, x0.clone())))
    assert torch.equal(x, plain) and all(torch.equal(a, b) for a, b in zip(frames, plain_frames))
    num_steps = 6 if sampler == "ddim" else T_TINY
    assert [(i, n) for i, n, _ in seen] == [(i, num_steps) for i in range(num_steps)]
    for _, _, x0 in seen:
        assert x0.shape == shape and x0.dtype == torch.float32
        assert x0.min().item() >= -1 and x0.max().item() <= 1
    assert torch.equal(seen[-1][2], x)
    assert (seen[0][2] - x).abs().max().item() > 0.01  # the first estimate is still a rough one


def test_callback_exception_stops_the_sampler_there(tiny_model, tiny_diffusion):
    class Enough(Exception):
        pass

    def stop(i, n, x0):
        if i == 2:
            raise Enough

    counting = CountingModel(tiny_model)
    with pytest.raises(Enough):
        tiny_diffusion.sample(counting, torch.arange(2), (2, 1, 28, 28), sampler="ddpm", callback=stop)
    assert len(counting.calls) == 3


def test_generate_passes_the_callback_and_returns_the_same_images(tiny_model, tiny_diffusion):
    from diffusion import generate

    labels, cfg = torch.tensor([0, 4]), SampleConfig(steps=4)
    seen = []
    images, _ = generate(tiny_model, tiny_diffusion, labels, torch.device("cpu"), cfg=cfg, seed=3,
                         callback=lambda i, n, x0: seen.append((i, n)))
    plain, _ = generate(tiny_model, tiny_diffusion, labels, torch.device("cpu"), cfg=cfg, seed=3)
    assert torch.equal(images, plain) and images.dtype == torch.uint8
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
