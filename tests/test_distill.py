"""The speed adapter (distill.py, --sampler lcm): one distillation step against a hand computation, stacking with a
style adapter, its files and tools, the real PEFT, a foreign base refused, and the CLI end to end.

Every adapter here has non-zero B and a non-zero guidance input, so a wrong scale, a missing w or a dropped tensor
shows."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

import denoise
import lora_finetune
import lora_tools
from adapter import Adapter, adapter_from_model, add_adapter_layers, attach_adapters, set_weights
from adapter_formats import CONFIG_NAME, load_adapter, write_adapter
from checkpoint import state_fingerprint
from config import DistillConfig, ModelConfig, preset_config
from diffusion import Diffusion
from distill import DistillBatch, distill_loss, draw_batch, teacher_step
from lora import BaseMismatch, add_guidance_input, mark_only_lora_as_trainable, merge_lora, remove_lora, unmerge_lora
from unet import UNet

R, ALPHA = 2, 3.0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return UNet(preset_config(ModelConfig, "tiny")).eval()


def randomise(params, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def student(seed=1, base_seed=0, style=None):
    """A tiny base with an adapter (a speed adapter: LoRA pairs and a guidance input; or a style's pairs alone)
    whose tensors are random; returns (model, Adapter with those tensors)."""
    model = tiny_model(base_seed)
    spec = Adapter({}, R, ALPHA, targets=["Wq", "Wk", "Wv"], style=style,
                   base_fingerprint=state_fingerprint(model.state_dict()), kind=None if style else "lcm")
    add_adapter_layers(model, spec)
    if not style:
        add_guidance_input(model)
    mark_only_lora_as_trainable(model)
    randomise([p for p in model.parameters() if p.requires_grad], seed)
    return model, adapter_from_model(model, spec)


def saved(tmp_path, name, **kw):
    path = str(tmp_path / name)
    write_adapter(path, student(**kw)[1])
    return path


# ------------------------------------------------------------------ one step, by hand

def scalings(t):
    st = 10.0 * t.double()
    return (0.25 / (st ** 2 + 0.25)).float().view(-1, 1, 1, 1), (st / (st ** 2 + 0.25).sqrt()).float().view(-1, 1, 1, 1)


X0_FROM = {"eps": lambda f, x, ab: (x - (1 - ab).sqrt() * f) / ab.sqrt(),
           "v": lambda f, x, ab: ab.sqrt() * x - (1 - ab).sqrt() * f}


@pytest.mark.parametrize("objective", sorted(X0_FROM))
@pytest.mark.parametrize("loss", ["huber", "l2"])
@pytest.mark.parametrize("parallel", [1.0, 0.5])
def test_a_consistency_step_against_a_hand_computation(objective, loss, parallel):
    """Teacher (base alone, guided at w, plain or projected), one DDIM step, EMA target and student, LCM's c_skip
    and c_out, the loss: written out here from the papers' formulas with plain network calls, and the
    distillation's value matches."""
    model, _ = student()
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() + 0.05 for p in params]  # the target differs from the student
    d = Diffusion(objective=objective)
    dcfg = DistillConfig(distill_loss=loss, distill_huber_c=0.01, distill_guidance_parallel=parallel)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, 1, 28, 28), generator=g) * 2 - 1
    b = DistillBatch(x0, torch.tensor([3, 7]), torch.tensor([259, 19]), torch.tensor([239, 0]),
                     torch.randn(x0.shape, generator=g), torch.tensor([1.5, 2.5]))
    got = distill_loss(model, d, b, params, ema, dcfg)

    ab, ab_p = (d.alphas_cumprod[t].view(-1, 1, 1, 1) for t in (b.t, b.t_prev))
    to_x0 = X0_FROM[objective]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * b.noise
    base = tiny_model()
    with torch.no_grad():
        x0_c = to_x0(base(x_t, b.t, b.labels), x_t, ab)
        x0_u = to_x0(base(x_t, b.t, torch.full_like(b.labels, 10)), x_t, ab)
        dx, a = x0_c - x0_u, x0_c + 1  # the push, and the image with black at 0 (projected guidance)
        d_par = (dx * a).sum((1, 2, 3), keepdim=True) / (a * a).sum((1, 2, 3), keepdim=True) * a
        push = dx if parallel == 1 else dx - d_par + parallel * d_par
        x0_g = (x0_c + b.w.view(-1, 1, 1, 1) * push).clamp(-1, 1)  # as DDIM's clipped estimate
        eps_g = (x_t - ab.sqrt() * x0_g) / (1 - ab).sqrt()
        x_prev = ab_p.sqrt() * x0_g + (1 - ab_p).sqrt() * eps_g  # DDIM, eta 0
        target_net = copy.deepcopy(model)
        for p, e in zip([p for p in target_net.parameters() if p.requires_grad], ema):
            p.copy_(e)
        c_skip, c_out = scalings(b.t_prev)
        target = c_skip * x_prev + c_out * to_x0(target_net(x_prev, b.t_prev, b.labels, w=b.w), x_prev, ab_p)
        c_skip, c_out = scalings(b.t)
        pred = c_skip * x_t + c_out * to_x0(model(x_t, b.t, b.labels, w=b.w), x_t, ab)
        target = target.clamp(-1, 1)  # read as the sampler reads it; past an end where it sits there: no cost
        diff = pred - target
        diff = torch.where(((target == -1) & (diff < 0)) | ((target == 1) & (diff > 0)), torch.zeros_like(diff), diff)
        want = diff.pow(2).mean() if loss == "l2" else ((diff ** 2 + 0.01 ** 2).sqrt() - 0.01).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the teacher's step on its own, where the projection is not diluted by the loss
    x_step = teacher_step(model, d, x_t, b, parallel=parallel)
    torch.testing.assert_close(x_step, x_prev, rtol=1e-5, atol=1e-6)
    if parallel != 1:  # and it moved the step: plain guidance lands elsewhere
        assert (teacher_step(model, d, x_t, b) - x_step).abs().max() > 5e-5  # 10x the tolerance above
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # the pairs and the guidance input
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base stays frozen
    assert all(torch.equal(p, q) for p, q in zip(params, [p for p in student()[0].parameters() if p.requires_grad]))


def test_the_draw_is_on_the_skipping_grid():
    d = Diffusion()
    x0 = torch.zeros((256, 1, 4, 4))
    b = draw_batch(d, x0, torch.zeros(256, dtype=torch.long), torch.Generator().manual_seed(0), (1.0, 3.0))
    assert set(b.t.tolist()) <= set(d.skip_grid()) and torch.equal(b.t_prev, (b.t - 20).clamp(min=0))
    assert 1.0 <= b.w.min() and b.w.max() <= 3.0 and b.w.std() > 0.3


# ------------------------------------------------------------------ stacking, files, tools

def probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn((3, 1, 28, 28), generator=g), torch.tensor([0, 250, 999]), torch.tensor([1, 5, 10])


def lcm_sample(model, steps=2):
    return Diffusion().sample(model, torch.arange(3), (3, 1, 28, 28), sampler="lcm", steps=steps, guidance=2.0,
                              generator=torch.Generator().manual_seed(0))[0]


def test_a_speed_and_a_style_adapter_stack_merge_and_unstack_exactly(tmp_path):
    speed, style = saved(tmp_path, "lcm"), saved(tmp_path, "italic", seed=2, style="italic")
    base = lcm_sample(tiny_model())
    model = tiny_model()
    ads = [load_adapter(speed), load_adapter(style)]
    attach_adapters(model, ads, state_fingerprint(model.state_dict()))
    unmerged = lcm_sample(model)
    assert (unmerged - base).abs().max() > 1e-2  # both really change the samples
    only_style = tiny_model()
    attach_adapters(only_style, [load_adapter(style)], state_fingerprint(only_style.state_dict()))
    assert (unmerged - lcm_sample(only_style)).abs().max() > 1e-2  # the guidance input counts
    merged = merge_lora(model)
    torch.testing.assert_close(lcm_sample(model), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model, merged)
    assert torch.equal(lcm_sample(model), unmerged)
    set_weights(model, ads, 0.0)
    assert torch.equal(lcm_sample(model), base)  # weight 0 is the base, the guidance input included
    set_weights(model, ads, 1.0)
    remove_lora(model)
    assert model.w_embed is None and torch.equal(lcm_sample(model), base)


def test_a_speed_adapter_on_a_base_it_was_not_distilled_from_is_refused(tmp_path):
    speed = saved(tmp_path, "lcm")
    other = tiny_model(seed=5)
    with pytest.raises(BaseMismatch, match="pass the base it was trained on"):
        attach_adapters(other, [load_adapter(speed)], state_fingerprint(other.state_dict()))
    assert other.w_embed is None  # refused before anything was attached


def test_the_file_records_kind_and_the_guidance_input_and_tools_keep_them(tiny_ckpt, tmp_path, capsys):
    model, ad = student()
    path = str(tmp_path / "lcm")
    write_adapter(path, ad)
    back = load_adapter(path)
    assert back.kind == "lcm" and torch.equal(back.saved_modules["w_embed.weight"], ad.saved_modules["w_embed.weight"])
    with open(os.path.join(path, CONFIG_NAME)) as f:
        assert json.load(f)["modules_to_save"] == ["w_embed"]
    lora_tools.main(["info", path])
    assert "kind lcm" in capsys.readouterr().out
    kohya = str(tmp_path / "lcm_kohya.safetensors")
    lora_tools.main(["convert", path, "--out", kohya, "--ckpt", tiny_ckpt])
    lora_tools.main(["convert", kohya, "--out", str(tmp_path / "again"), "--ckpt", tiny_ckpt])
    for p in (kohya, str(tmp_path / "again")):
        other = load_adapter(p)
        assert other.kind == "lcm" and torch.equal(other.saved_modules["w_embed.weight"],
                                                   ad.saved_modules["w_embed.weight"])
    lora_tools.main(["resize", path, "--r", "1", "--out", str(tmp_path / "r1"), "--ckpt", tiny_ckpt])
    small = load_adapter(str(tmp_path / "r1"))
    assert small.r == 1 and small.kind == "lcm" and "w_embed.weight" in small.saved_modules


def test_the_real_peft_loads_a_speed_adapter(tmp_path):
    """PEFT rebuilds it on a UNet given the guidance input as a plain Linear (modules_to_save), output for output."""
    peft = pytest.importorskip("peft", reason="the PEFT checks need requirements-dev.txt")
    path = saved(tmp_path, "lcm")
    x, t, labels = probe()
    w = torch.tensor([1.0, 2.0, 3.0])
    ours = tiny_model()
    attach_adapters(ours, [load_adapter(path)], state_fingerprint(ours.state_dict()))
    base = tiny_model()
    base.w_embed = nn.Linear(base.cfg.time_dim, base.cfg.time_dim, bias=False)
    nn.init.zeros_(base.w_embed.weight)
    theirs = peft.PeftModel.from_pretrained(base, path).eval()
    with torch.no_grad():
        want = ours(x, t, labels, w=w)
        assert (want - tiny_model()(x, t, labels)).abs().max() > 1e-3
        assert (want - ours(x, t, labels)).abs().max() > 1e-3  # the guidance input's share, which PEFT must load
        torch.testing.assert_close(theirs(x, t, labels, w=w), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the command line

def test_distill_flags_it_cannot_honour_are_refused(tiny_ckpt, tmp_path, capsys):
    for extra, message in ((["--style", "bold"], "drop --style"), (["--full"], "drop --full"),
                           (["--distill-w", "3,1"], "lo <= hi"), (["--precision", "bf16"], "trains in fp32"),
                           (["--lora-steps", "5"], "takes --distill-steps and --distill-batch-size, its own: drop "
                                                   "--lora-steps"),
                           (["--distill-batch-size", "4501"], "lower --distill-batch-size")):
        with pytest.raises(SystemExit) as e:
            lora_finetune.main(["--preset", "tiny", "--ckpt", tiny_ckpt, "--distill", "lcm", "--out",
                                str(tmp_path / "lcm"), *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "lcm")
    with pytest.raises(SystemExit) as e:  # a distillation's flag alone changes nothing: refused, not ignored
        lora_finetune.main(["--preset", "tiny", "--ckpt", tiny_ckpt, "--distill-ema", "0.9", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--distill-ema apply to --distill lcm only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_distill_end_to_end_then_sample_it_stacked(tiny_ckpt, tiny_adapter, tmp_path):
    out = lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", tiny_ckpt,
                              "--distill", "lcm", "--distill-steps", "3", "--out", str(tmp_path / "lcm")])
    ad = load_adapter(out)
    assert ad.kind == "lcm" and ad.base_fingerprint and ad.saved_modules["w_embed.weight"].abs().sum() > 0
    assert os.path.exists(os.path.join(out, "loss.csv"))
    written = denoise.main(["--ckpt", tiny_ckpt, "--lora", out, "--lora", tiny_adapter, "--sampler", "lcm",
                            "--steps", "2", "--merge", "--frames", "0", "--device", "cpu", "--precision", "fp32",
                            "--out-dir", str(tmp_path / "samples")])
    assert written


@pytest.mark.slow
def test_ctrl_c_saves_the_speed_adapter_so_far(tiny_ckpt, tmp_path, monkeypatch):
    import distill
    calls = []
    real = distill.distill_loss

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(distill, "distill_loss", interrupted)
    out = str(tmp_path / "lcm")
    with pytest.raises(SystemExit) as e:
        lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--ckpt", tiny_ckpt, "--distill", "lcm",
                            "--distill-steps", "10", "--out", out])
    assert e.value.code == 130
    ad = load_adapter(out)  # whole, after two steps
    assert ad.kind == "lcm" and ad.saved_modules["w_embed.weight"].abs().sum() > 0
