"""The UNet: shapes, label conditioning, attention against a hand-written reference, and gradient flow."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from config import ModelConfig, preset_config
from unet import Attention, UNet, timestep_embedding


def tiny_cfg(**overrides):
    return preset_config(ModelConfig, "tiny", **overrides)


def inputs(batch=4, seed=0, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 1, 28, 28), generator=g)
    t = torch.randint(0, 50, (batch,), generator=g)
    labels = torch.randint(0, num_classes + 1, (batch,), generator=g)  # includes the null label
    return x, t, labels


def attention_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("cfg", [tiny_cfg(), tiny_cfg(patch_size=1), ModelConfig()], ids=["tiny", "tiny-p1", "fast"])
def test_output_shape_matches_input(cfg):
    model = UNet(cfg).eval()
    x, t, labels = inputs(batch=3)
    with torch.no_grad():
        out = model(x, t, labels)
    assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_presets_are_differences_from_the_defaults():
    """Every preset value names a real field and differs from its default; "fast" is the default itself."""
    import dataclasses

    from config import PRESETS

    assert PRESETS["fast"] == {}
    for name, by_class in PRESETS.items():
        for cls, overrides in by_class.items():
            defaults = cls()
            fields = {f.name for f in dataclasses.fields(cls)}
            for key, value in overrides.items():
                assert key in fields, f"preset {name}: {cls.__name__} has no field {key}"
                assert getattr(preset_config(cls, name), key) != getattr(defaults, key), \
                    f"preset {name}: {cls.__name__}.{key}={value!r} is the default already"


def test_different_labels_give_different_outputs():
    model = UNet(tiny_cfg()).eval()
    x, t, _ = inputs(batch=2)
    with torch.no_grad():
        a = model(x, t, torch.tensor([3, 3]))
        b = model(x, t, torch.tensor([7, 7]))
        null = model(x, t, torch.tensor([10, 10]))
        again = model(x, t, torch.tensor([3, 3]))
    assert torch.equal(a, again)
    assert (a - b).abs().max().item() > 1e-4
    assert (a - null).abs().max().item() > 1e-4


def test_different_timesteps_give_different_outputs():
    model = UNet(tiny_cfg()).eval()
    x, _, labels = inputs(batch=2)
    with torch.no_grad():
        a = model(x, torch.tensor([1, 1]), labels)
        b = model(x, torch.tensor([40, 40]), labels)
    assert (a - b).abs().max().item() > 1e-4


def test_batch_elements_are_independent():
    model = UNet(tiny_cfg()).eval()
    x, t, labels = inputs(batch=4)
    with torch.no_grad():
        whole = model(x, t, labels)
        first = model(x[:1], t[:1], labels[:1])
    torch.testing.assert_close(whole[:1], first, atol=1e-5, rtol=1e-5)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 16)
    assert emb.shape == (3, 16)
    assert torch.equal(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))  # cos(0)=1, sin(0)=0
    assert timestep_embedding(torch.tensor([5]), 7).shape == (1, 7)  # odd widths are padded


def test_attention_matches_reference_multi_head_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    q, k, v = x @ attn.Wq.weight.T, ctx @ attn.Wk.weight.T, ctx @ attn.Wv.weight.T
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        p = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4), dim=-1)  # (B, L, S)
        heads.append(p @ v[..., sl])
    expected = F.linear(torch.cat(heads, dim=-1), attn.Wo.weight, attn.Wo.bias)
    torch.testing.assert_close(attn(x, ctx), expected, atol=1e-6, rtol=1e-5)
    # without a context it is self-attention: keys and values from x
    self_attn = Attention(dim=8, num_heads=2)
    assert self_attn(x).shape == (2, 5, 8)


def _qkv_grads(model):
    x, t, labels = inputs(batch=4)
    model(x, t, labels).pow(2).mean().backward()
    return {f"{n}.{w}": getattr(m, w).weight.grad for n, m in attention_modules(model).items()
            for w in ("Wq", "Wk", "Wv")}


def test_every_attention_projection_gets_a_gradient():
    model = UNet(tiny_cfg())
    attns = attention_modules(model)
    # down level 1, middle, up level 1; each a self-attention (attn1) and a cross-attention (attn2)
    assert len(attns) == 6
    assert sum(n.endswith("attn1") for n in attns) == 3 and sum(n.endswith("attn2") for n in attns) == 3
    grads = _qkv_grads(model)
    assert len(grads) == 18
    for name, g in grads.items():
        assert g is not None, name
        assert g.abs().max().item() > 1e-7, f"{name} got no gradient"


def test_one_context_token_freezes_cross_attention_query_and_key():
    """The tutorial's bug: one key makes softmax identically 1, so Wq and Wk of attn2 never learn."""
    cfg = tiny_cfg()
    cfg.context_tokens = 1  # bypasses __post_init__, which rejects this (next test)
    model = UNet(cfg)
    with sdpa_kernel(SDPBackend.MATH):  # the unfused softmax backward gives exact zeros: s * (g - g * s), s = 1
        grads = _qkv_grads(model)
    cross = {n: g for n, g in grads.items() if ".attn2." in n}
    assert len(cross) == 9
    for name, g in cross.items():
        if name.endswith(("Wq", "Wk")):
            assert torch.count_nonzero(g) == 0, f"{name} should get exactly zero gradient"
        else:
            assert g.abs().max().item() > 1e-7, name
    for name, g in grads.items():
        if ".attn1." in name:  # self-attention has HW keys and still learns
            assert g.abs().max().item() > 1e-7, name


def test_one_context_token_with_fused_attention_kernels_is_zero_up_to_rounding():
    cfg = tiny_cfg()
    cfg.context_tokens = 1
    grads = _qkv_grads(UNet(cfg))
    for name, g in grads.items():
        if ".attn2." in name and name.endswith(("Wq", "Wk")):
            wv = grads[name[:-2] + "Wv"]
            assert g.abs().max().item() < 1e-5 * wv.abs().max().item(), name


def test_position_code_tells_every_token_apart_by_row_and_column():
    from unet import position_code
    h, w, dim = 7, 5, 18  # 18: four quarters of 4 channels, 2 left over as zeros
    code = position_code(h, w, dim, "cpu", torch.float32).view(h, w, dim)
    assert torch.equal(code[..., 16:], torch.zeros(h, w, 2))
    assert len({tuple(v.tolist()) for v in code.view(h * w, dim)}) == h * w  # no two positions alike
    assert torch.equal(code[:, :1, :8].expand(h, w, 8), code[..., :8])  # the first half: the row alone
    assert torch.equal(code[:1, :, 8:16].expand(h, w, 8), code[..., 8:16])  # the second half: the column alone
    # frequency 1 (the first of 4): sin and cos of the row at channels 0 and 4, of the column at 8 and 12
    assert torch.allclose(code[2, 3, [0, 4, 8, 12]], torch.tensor([math.sin(2), math.cos(2), math.sin(3), math.cos(3)]))


@pytest.mark.parametrize("pos_emb", [False, True])
def test_only_the_position_code_lets_a_transformer_block_see_where_a_token_is(pos_emb):
    """On a feature map equal at every position, a transformer block without the position code gives the same
    output everywhere (nothing in it knows positions, so neither can a LoRA on its Wq/Wk/Wv); with it, not."""
    from unet import SpatialTransformer
    torch.manual_seed(0)
    block = SpatialTransformer(16, 2, 8, pos_emb=pos_emb).eval()
    for p in block.parameters():  # proj_out starts at zero in no layer here, but make sure the block acts
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 16, 1, 1).expand(2, 16, 5, 5).contiguous()
    with torch.no_grad():
        out = block(x, torch.randn(2, 3, 8))
    spread = (out - out[:, :, :1, :1]).abs().max().item()
    assert (spread > 1e-2) if pos_emb else (spread < 1e-5)


def test_model_config_rejects_a_single_context_token():
    with pytest.raises(ValueError, match="gradient"):
        ModelConfig(context_tokens=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=30), "divisible"),
    (dict(attn_levels=(2,)), "out of range"),
    (dict(channels=(64, 126)), "num_heads"),
    (dict(channels=(0, 8)), "positive"),
])
def test_model_config_rejects_inconsistent_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)
