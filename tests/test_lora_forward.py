"""LoraLayer.forward's two routes give the formula's output: the low-rank path while the adapter trains,
the update folded into the weight for the call otherwise (inference, a frozen adapter)."""
import pytest
import torch
import torch.nn as nn

from lora import LoraLayer


def layer_with_non_zero_b(dropout=0.0, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias)
    layer = LoraLayer(base, 6, 5, r=2, alpha=3.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(2, 5))
    return layer


def formula(layer, x):
    return layer.net(x) + x @ layer.lora_a @ layer.lora_b * (layer.alpha / layer.r * layer.scale)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (6,)])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_and_low_rank_routes_match_the_formula(shape, bias):
    layer = layer_with_non_zero_b(bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = formula(layer, x)
        folded = layer(x)  # no gradient wanted: the folded weight
    trained = layer(x)  # the adapter wants gradients: the low-rank path
    assert (expected - layer.net(x)).abs().max().item() > 1e-2  # the update is not a no-op
    torch.testing.assert_close(folded, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(trained, expected, atol=1e-6, rtol=1e-5)
    trained.sum().backward()
    assert layer.lora_a.grad.abs().max() > 0 and layer.lora_b.grad.abs().max() > 0


def test_frozen_adapter_folds_and_still_passes_gradients_to_its_input():
    layer = layer_with_non_zero_b()
    layer.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, formula(layer, x), atol=1e-6, rtol=1e-5)
    out.sum().backward()
    expected = (layer.net.weight + layer.delta_weight()).sum(0)  # d/dx of sum(x W'^T) is the column sums of W'
    torch.testing.assert_close(x.grad, expected.expand(3, 6), atol=1e-6, rtol=1e-5)


def test_scale_zero_is_the_base_on_both_routes():
    layer = layer_with_non_zero_b()
    layer.scale = 0.0
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), layer.net(x))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.net(x))


def test_dropout_applies_to_the_lora_path_in_training_only():
    layer = layer_with_non_zero_b(dropout=0.5)
    x = torch.randn(8, 6)
    with torch.no_grad():
        layer.train()
        a, b = layer(x), layer(x)
        layer.eval()
        c = layer(x)
    assert not torch.equal(a, b)  # a fresh dropout mask each call, on the LoRA input only
    torch.testing.assert_close(c, formula(layer, x), atol=1e-6, rtol=1e-5)


def test_bf16_autocast_on_both_routes():
    layer = layer_with_non_zero_b()
    x = torch.randn(4, 6)
    expected = formula(layer, x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            folded = layer(x)
        trained = layer(x)
    for out in (folded, trained):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
