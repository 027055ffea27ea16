"""The tutorial preset is the tutorial's network: its size, its nine cross-attentions, and where its LoRA goes.

The tutorial's UNet (owenliang/pytorch-diffusion: unet.py, conv_block.py, cross_attn.py) has
32,175,313 parameters: one conv block per level at 48, 24, 12, 6 and 3 pixels (64 to 1024
channels), encoder and decoder, and inside every block a cross-attention from the pixels to the
label with Wq, Wk, Wv 16 wide, nine in all. One forward and one backward of the 33.7 M parameter
model on a single 48 x 48 image: a few seconds on a CPU.
"""
import pytest
import torch

from config import LoraConfig, ModelConfig, preset_config
from lora import add_lora, lora_layers
from unet import Attention, CrossAttentionBlock, SpatialTransformer, UNet, count_parameters

TUTORIAL_PARAMETERS = 32_175_313  # the tutorial's UNet(img_channel=1), counted from its code
OURS = 33_674_849  # the residual blocks' 1x1 skip convolutions are most of the difference (README)
# (level, pixels) of the nine blocks in the order the forward pass runs them: encoder, then decoder
BLOCKS = [(0, 48), (1, 24), (2, 12), (3, 6), (4, 3), (3, 6), (2, 12), (1, 24), (0, 48)]
CHANNELS = (64, 128, 256, 512, 1024)


@pytest.fixture(scope="module")
def cfg():
    return preset_config(ModelConfig, "tutorial")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return UNet(cfg)


def cross_blocks(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, CrossAttentionBlock)}


def test_preset_sizes(cfg):
    assert (cfg.arch, cfg.img_size, cfg.patch_size, cfg.channels) == ("tutorial", 48, 1, CHANNELS)
    assert cfg.num_res_blocks == 1 and cfg.attn_levels == (0, 1, 2, 3, 4)
    assert (cfg.attn_dim, cfg.context_dim, cfg.num_heads) == (16, 32, 1)
    assert cfg.context_tokens >= 2  # the tutorial's single label token gives Wq, Wk no gradient


def test_parameter_count_within_ten_percent_of_the_tutorial(model):
    n = count_parameters(model)
    assert n == OURS
    assert abs(n / TUTORIAL_PARAMETERS - 1) < 0.10


def test_nine_cross_attentions_and_nothing_else(model):
    blocks = cross_blocks(model)
    assert len(blocks) == 9
    assert not any(isinstance(m, SpatialTransformer) for m in model.modules())  # no self-attention
    attns = [n for n, m in model.named_modules() if isinstance(m, Attention)]
    assert sorted(attns) == sorted(f"{n}.attn" for n in blocks)
    for name, block in blocks.items():
        c = block.norm1.normalized_shape[0]
        a = block.attn
        assert (a.Wq.in_features, a.Wq.out_features) == (c, 16)
        assert (a.Wk.in_features, a.Wk.out_features) == (32, 16)  # from a label token of width 32
        assert (a.Wv.in_features, a.Wv.out_features) == (32, 16)
        assert (a.Wo.in_features, a.Wo.out_features) == (16, c)
        assert block.ff[0].out_features == 32  # the tutorial's feed-forward, 32 wide


def test_forward_runs_every_cross_attention_at_its_resolution(model):
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen.append((n, tuple(args[0].shape), out.shape)))
             for n, m in cross_blocks(model).items()]
    try:
        x = torch.randn(1, 1, 48, 48)
        out = model(x, torch.tensor([500]), torch.tensor([3]))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 1, 48, 48) and torch.isfinite(out).all()
    assert [(shape[1], shape[2]) for _, shape, _ in seen] == [(CHANNELS[lvl], px) for lvl, px in BLOCKS]
    assert all(o == s for _, s, o in seen)  # a cross-attention keeps the feature map's shape
    names = [n for n, _, _ in seen]
    assert len(set(names)) == 9 and sum(n.startswith("down.") for n in names) == 5

    # with several label tokens every projection of every block learns (one token: Wq, Wk get zero gradient)
    out.pow(2).mean().backward()
    for name, block in cross_blocks(model).items():
        for w in ("Wq", "Wk", "Wv"):
            g = getattr(block.attn, w).weight.grad
            assert g is not None and g.abs().max().item() > 0, f"{name}.attn.{w}"
    model.zero_grad(set_to_none=True)


def test_lora_rank_8_lands_in_all_nine_cross_attentions(cfg):
    lcfg = preset_config(LoraConfig, "tutorial")
    assert lcfg.r == 8 and lcfg.targets == ("Wq", "Wk", "Wv")
    torch.manual_seed(0)
    model = UNet(cfg)
    blocks = cross_blocks(model)
    layers = add_lora(model, lcfg.targets, lcfg.r, lcfg.alpha)
    assert set(layers) == set(lora_layers(model)) == {f"{n}.attn.{w}" for n in blocks for w in ("Wq", "Wk", "Wv")}
    assert len(layers) == 27
    assert all(layer.r == {"default": 8} and layer.lora_A["default"].weight.shape[0] == 8 for layer in layers.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="tutorial2"), "arch must be one of"),
    (dict(attn_dim=16), "need arch tutorial"),
    (dict(ff_dim=32), "need arch tutorial"),
    (dict(arch="tutorial", attn_dim=-1, pos_emb=False), ">= 0"),
    (dict(arch="tutorial", attn_dim=10, num_heads=4, pos_emb=False), "attn_dim must be divisible by num_heads=4"),
    (dict(arch="tutorial"), "the tutorial arch has none: pass --no-pos-emb"),
])
def test_model_config_rejects_bad_tutorial_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_tutorial_layout_on_a_small_config():
    """The same layout at test size: several blocks per level, batch elements independent, labels matter."""
    cfg = ModelConfig(arch="tutorial", patch_size=1, channels=(8, 16, 32), attn_levels=(0, 1, 2), num_heads=2,
                      num_res_blocks=2, context_tokens=2, context_dim=8, time_dim=16, attn_dim=4, ff_dim=0,
                      pos_emb=False)
    model = UNet(cfg).eval()
    assert len(cross_blocks(model)) == 2 * 3 + 2 * 2
    assert all(b.ff is None for b in cross_blocks(model).values())
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 20, 40])
    with torch.no_grad():
        out = model(x, t, torch.tensor([1, 2, 10]))
        first = model(x[:1], t[:1], torch.tensor([1]))
        other = model(x[:1], t[:1], torch.tensor([7]))
    assert out.shape == x.shape
    torch.testing.assert_close(out[:1], first, atol=1e-5, rtol=1e-5)
    assert (first - other).abs().max().item() > 1e-4
