"""LoraLayer.forward's two routes give the formula's output, for nn.Linear and nn.Conv2d: the low-rank path while
the adapter trains, the update folded into the weight for the call otherwise (inference, a frozen adapter); and
several adapters side by side add up, merge, and unmerge to the base bit for bit."""
import pytest
import torch
import torch.nn as nn

from lora import LoraError, LoraLayer, merge_lora, unmerge_lora


def layer_with_non_zero_b(dropout=0.0, bias=True, conv=None):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, **conv, bias=bias) if conv else nn.Linear(6, 5, bias=bias)
    layer = LoraLayer(base)
    layer.add_adapter("default", 2, 3.0, dropout)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape))
    return layer


def formula(layer, x, name="default"):
    """base(x) + s B(A(x)), written with the functional ops: for a conv, A a k x k conv with the base's stride,
    padding and dilation to r channels, B a 1x1 conv back."""
    base, a, b = layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight
    if isinstance(base, nn.Linear):
        update = x @ a.T @ b.T
    else:
        update = nn.functional.conv2d(nn.functional.conv2d(x, a, None, base.stride, base.padding, base.dilation), b)
    return base(x) + update * layer.scaling(name)


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
         dict(kernel_size=(3, 1), padding=(2, 0), dilation=2)]


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (6,)])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_and_low_rank_routes_match_the_formula(shape, bias):
    layer = layer_with_non_zero_b(bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = formula(layer, x)
        folded = layer(x)  # no gradient wanted: the folded weight
    trained = layer(x)  # the adapter wants gradients: the low-rank path
    assert (expected - layer.base_layer(x)).abs().max().item() > 1e-2  # the update is not a no-op
    torch.testing.assert_close(folded, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(trained, expected, atol=1e-6, rtol=1e-5)
    trained.sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().max() > 0 and layer.lora_B["default"].weight.grad.abs().max() > 0


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_routes_match_the_formula(conv, bias):
    layer = layer_with_non_zero_b(bias=bias, conv=conv)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (2, 3, *layer.base_layer.kernel_size) and b.shape == (5, 2, 1, 1)  # PEFT's shapes
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        expected = formula(layer, x)
        folded = layer(x)
    trained = layer(x)
    assert (expected - layer.base_layer(x)).abs().max().item() > 1e-2
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=1e-5)
    trained.sum().backward()
    assert a.grad.abs().max() > 0 and b.grad.abs().max() > 0
    # the merge formula: B[:, :, 0, 0] @ A reshaped, the base weight's shape
    delta = layer.delta_weight("default")
    assert delta.shape == layer.base_layer.weight.shape and delta.dtype == torch.float32
    with torch.no_grad():
        merged = layer.base_layer._conv_forward(x, layer.base_layer.weight + delta, layer.base_layer.bias)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_frozen_adapter_folds_and_still_passes_gradients_to_its_input():
    layer = layer_with_non_zero_b()
    layer.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, formula(layer, x), atol=1e-6, rtol=1e-5)
    out.sum().backward()
    expected = (layer.base_layer.weight + layer.delta_weight("default")).sum(0)  # d/dx sum(x W'^T): W's column sums
    torch.testing.assert_close(x.grad, expected.expand(3, 6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("conv", [None, CONVS[0]])
def test_weight_zero_and_disabled_are_the_base_on_both_routes(conv):
    layer = layer_with_non_zero_b(conv=conv)
    x = torch.randn(2, 3, 6, 6) if conv else torch.randn(4, 6)
    for off in ("weight", "enabled"):
        layer.set_weight("default", 0.0) if off == "weight" else layer.enable("default", False)
        assert torch.equal(layer(x), layer.base_layer(x))
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base_layer(x))
        layer.set_weight("default", 1.0)
        layer.enable("default", True)
    layer.set_weight("default", -0.5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), formula(layer, x), atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("conv", [None, CONVS[0]])
def test_bf16_autocast_on_both_routes(conv):
    layer = layer_with_non_zero_b(conv=conv)
    x = torch.randn(2, 3, 6, 6) if conv else torch.randn(4, 6)
    expected = formula(layer, x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            folded = layer(x)
        trained = layer(x)
    for out in (folded, trained):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------ several adapters side by side

def two_adapters(conv=None):
    """One layer with adapters "a" (r 2, alpha 3, weight 0.8) and "b" (r 3, alpha 1, weight -0.5), both non-zero."""
    layer = layer_with_non_zero_b(conv=conv)
    layer.delete_adapter("default")
    g = torch.Generator().manual_seed(1)
    for name, r, alpha, weight in (("a", 2, 3.0, 0.8), ("b", 3, 1.0, -0.5)):
        layer.add_adapter(name, r, alpha)
        layer.set_weight(name, weight)
        with torch.no_grad():
            layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g))
    return layer


@pytest.mark.parametrize("conv", [None, CONVS[1]])
def test_adapters_side_by_side_add_up(conv):
    layer = two_adapters(conv)
    assert layer.adapter_names == ["a", "b"] and "r=3, alpha=1, weight=-0.5" in repr(layer)
    x = torch.randn(2, 3, 8, 8) if conv else torch.randn(4, 6)
    expected = formula(layer, x, "a") + formula(layer, x, "b") - layer.base_layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # the low-rank route
    layer.enable("a", False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), formula(layer, x, "b"), atol=1e-5, rtol=1e-5)
    layer.delete_adapter("b")
    assert layer.adapter_names == ["a"] and set(layer.weights) == {"a"}
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # "a" is off


@pytest.mark.parametrize("conv", [None, CONVS[0]])
def test_merge_of_several_adapters_and_exact_unmerge(conv):
    model = nn.Sequential(two_adapters(conv)).eval()
    layer = model[0]
    base_weight = layer.base_layer.weight.clone()
    x = torch.randn(2, 3, 8, 8) if conv else torch.randn(4, 6)
    with torch.no_grad():
        unmerged = model(x)
    merged = merge_lora(model)
    assert type(model[0]) is type(layer.base_layer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    expected = base_weight + layer.delta_weight("a") + layer.delta_weight("b")
    torch.testing.assert_close(model[0].weight, expected, atol=1e-6, rtol=0)
    unmerge_lora(model, merged)
    assert model[0] is layer and torch.equal(layer.base_layer.weight, base_weight)  # bit for bit
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


def test_names_and_ranks_are_checked():
    layer = LoraLayer(nn.Linear(4, 4))
    with pytest.raises(LoraError, match="r must be a whole number from 1 to 4096, got 0"):
        layer.add_adapter("x", 0, 1.0)
    with pytest.raises(LoraError, match="without dots"):
        layer.add_adapter("a.b", 2, 1.0)
    layer.add_adapter("x", 2, 1.0)
    with pytest.raises(LoraError, match="already holds an adapter named 'x'"):
        layer.add_adapter("x", 2, 1.0)
    with pytest.raises(LoraError, match=r"no adapter named 'y' here; this layer holds \['x'\]"):
        layer.set_weight("y", 1.0)
    with pytest.raises(LoraError, match="adapts nn.Linear and nn.Conv2d"):
        LoraLayer(nn.ConvTranspose2d(2, 2, 2))
