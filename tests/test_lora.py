"""LoRA: the layer against its formula, merge/unmerge, adapter files, freezing, and the style data.

Every equivalence is checked with B set to non-zero values: with the initial B = 0 the
update is zero and merged == unmerged == base would hold even for a broken implementation.
"""
import argparse
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

import lora_finetune
from config import LoraConfig, ModelConfig, preset_config
from cli import add_config_args, config_from_args
from dataset import apply_style, load_dataset
from adapter import Adapter, adapter_from_model, apply_adapter
from adapter_formats import (CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, adapter_size, load_adapter, load_training_state,
                             write_adapter)
from checkpoint import load_checkpoint, save_checkpoint, state_fingerprint
from metrics import ink, slant
from lora import (LoraError, LoraLayer, add_lora, lora_layers, lora_state_dict, mark_only_lora_as_trainable,
                  merge_lora, resolve_targets, set_lora_weight, unmerge_lora)
from unet import Attention, UNet

DEFAULT_TARGETS = LoraConfig().targets


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return UNet(preset_config(ModelConfig, "tiny")).eval()


def randomise_lora(model, seed=1, std=0.1):
    """Non-zero A and B in every adapter, so that the LoRA update really changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.adapter_names:
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def probe_inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn((batch, 1, 28, 28), generator=g), torch.tensor([0, 25, 49])[:batch], torch.tensor([1, 5, 10])[:batch]


def forward(model):
    with torch.no_grad():
        return model(*probe_inputs())


# ------------------------------------------------------------------ the layer

def test_fresh_lora_layer_is_a_no_op():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLayer(base)
    layer.add_adapter("default", 2, 4.0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
    assert a.shape == (2, 6) and b.shape == (5, 2) and a.dtype == torch.float32  # PEFT's (r, in) and (out, r)
    x = torch.randn(3, 4, 6)
    assert torch.equal(layer(x), base(x))


def test_a_seed_draws_the_same_a_as_before():
    """A is drawn as this project always drew it, through the transpose of an (in, r) tensor, so a seeded
    fine-tune starts (and ends) where it did before the layers took PEFT's shapes."""
    torch.manual_seed(3)
    old = torch.empty(6, 2)
    nn.init.kaiming_uniform_(old.T, a=5 ** 0.5)
    layer = LoraLayer(nn.Linear(6, 5))
    torch.manual_seed(3)
    layer.add_adapter("default", 2, 1.0)
    assert torch.equal(layer.lora_A["default"].weight, old.T)


def test_lora_layer_matches_its_formula_with_non_zero_b():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLayer(base)
    layer.add_adapter("default", 2, 3.0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.copy_(torch.randn(5, 2))
    x = torch.randn(4, 6)
    base_out = x @ base.weight.T + base.bias
    update = x @ a.T @ b.T * (3.0 / 2)
    assert update.abs().max().item() > 1e-2
    torch.testing.assert_close(layer(x), base_out + update, atol=1e-6, rtol=1e-5)
    layer.set_weight("default", 0.5)
    torch.testing.assert_close(layer(x), base_out + 0.5 * update, atol=1e-6, rtol=1e-5)
    layer.set_weight("default", 0.0)
    assert torch.equal(layer(x), base(x))
    # the merge formula: the same update in nn.Linear's (out, in) layout
    layer.set_weight("default", 1.0)
    torch.testing.assert_close(x @ layer.delta_weight("default").T, update, atol=1e-6, rtol=1e-5)


def test_lora_rank_must_be_positive():
    with pytest.raises(LoraError, match="r must be a whole number from 1 to 4096, got 0"):
        LoraLayer(nn.Linear(4, 4)).add_adapter("default", 0, 1.0)
    with pytest.raises(LoraError, match="r must be a whole number from 1 to 4096, got -1"):
        add_lora(tiny_model(), r=-1)
    with pytest.raises(LoraError, match="got 2.0"):
        add_lora(tiny_model(), r=2.0)
    with pytest.raises(ValueError, match="--r 4"):
        LoraConfig(r=0)


# ------------------------------------------------------------------ add_lora

def test_add_lora_wraps_exactly_the_attention_projections():
    model = tiny_model()
    attentions = [n for n, m in model.named_modules() if isinstance(m, Attention)]
    layers = add_lora(model, DEFAULT_TARGETS, r=2, alpha=2.0)
    expected = {f"{a}.{w}" for a in attentions for w in ("Wq", "Wk", "Wv")}
    assert set(layers) == set(lora_layers(model)) == expected
    assert len(expected) == 18  # 3 transformer blocks x (attn1, attn2) x (Wq, Wk, Wv)
    assert any(".attn1." in n for n in expected) and any(".attn2." in n for n in expected)
    for name, m in model.named_modules():
        if name.endswith(".Wo") or ".ff." in name:
            assert type(m) is not LoraLayer, name
    # the wrapped layer is the original one, and its shape is kept
    assert all(isinstance(layer.base_layer, nn.Linear) for layer in layers.values())
    assert layers["mid_attn.block.attn2.Wk"].lora_A["default"].weight.shape == (2, 8)  # context_dim 8 -> 16 channels
    assert layers["mid_attn.block.attn2.Wk"].lora_B["default"].weight.shape == (16, 2)
    # one LoraLayer a layer, each adapter's tensors in it by name
    assert "mid_attn.block.attn2.Wk.lora_A.default.weight" in model.state_dict()


def test_add_lora_targets_that_match_nothing_list_the_names():
    with pytest.raises(LoraError, match=r"match no nn.Linear.*'Wo'.*'time_proj'") as e:
        add_lora(tiny_model(), ("foo",))
    assert "'Wq'" in str(e.value) and "attn-all" in str(e.value)


def test_target_groups():
    model = tiny_model()
    attn = resolve_targets(model, "attn")
    assert attn == resolve_targets(model, ("Wq", "Wk", "Wv")) and len(attn) == 18
    attn_all = resolve_targets(model, "attn-all")
    assert set(attn) < set(attn_all) and len(attn_all) == 18 + 6 + 3 * 2  # + Wo of 6 attentions, ff.0 and ff.2 of 3
    assert "mid_attn.block.attn1.Wo" in attn_all and "mid_attn.block.ff.2" in attn_all
    every = resolve_targets(model, "all")
    linear_or_conv = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert set(attn_all) < set(every) and set(every) == {n for n in linear_or_conv
                                                          if n.split(".")[0] not in ("time_mlp", "conv_in", "conv_out")}
    assert {"mid1.conv1", "mid1.time_proj", "mid_attn.proj_in", "downsample.0"} <= set(every)
    assert resolve_targets(model, "all,conv_out,time_mlp.0")[-1] == "conv_out"  # named explicitly, then in
    picked = [n for n in linear_or_conv if n.endswith("Wq") or n == "mid1.conv1"]
    assert resolve_targets(model, "Wq,mid1.conv1") == picked
    with pytest.raises(LoraError, match=r"targets \['nope'\] match no"):
        resolve_targets(model, ("attn", "nope"))
    layers = add_lora(model, "all", r=2, alpha=2.0)
    conv = layers["mid1.conv1"]
    assert conv.lora_A["default"].weight.shape == (2, 16, 3, 3) and conv.lora_B["default"].weight.shape == (16, 2, 1, 1)


# ------------------------------------------------------------------ merging

def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    model = tiny_model()
    base_out = forward(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, DEFAULT_TARGETS, r=2, alpha=2.0)
    assert torch.equal(forward(model), base_out)  # B = 0: still the base
    randomise_lora(model)
    lora_out = forward(model)
    assert (lora_out - base_out).abs().max().item() > 1e-3

    merged = merge_lora(model)
    assert len(merged) == 18
    assert not lora_layers(model)
    for name in merged:
        assert type(model.get_submodule(name)) is nn.Linear, name
    merged_out = forward(model)
    torch.testing.assert_close(merged_out, lora_out, atol=1e-5, rtol=1e-5)
    assert (merged_out - base_out).abs().max().item() > 1e-3
    # merged weight = W + (A B)^T alpha / r
    layer = merged["mid_attn.block.attn1.Wq"]
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (2.0 / 2)
    expected = base_weights["mid_attn.block.attn1.Wq.weight"] + delta
    torch.testing.assert_close(model.get_submodule("mid_attn.block.attn1.Wq").weight, expected, atol=1e-6, rtol=0)

    unmerge_lora(model, merged)
    assert set(lora_layers(model)) == set(merged)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, base_weights[f"{name}.weight"]), name
    assert torch.equal(forward(model), lora_out)
    set_lora_weight(model, 0.0)
    assert torch.equal(forward(model), base_out)


@pytest.mark.parametrize("targets", ["all", "attn-all"])
def test_merge_of_conv_and_linear_adapters_and_exact_unmerge(targets):
    model = tiny_model()
    base_out = forward(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, targets, r=2, alpha=3.0)
    randomise_lora(model)
    lora_out = forward(model)
    assert (lora_out - base_out).abs().max().item() > 1e-3
    merged = merge_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(forward(model), lora_out, atol=1e-5, rtol=1e-5)
    unmerge_lora(model, merged)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, base_weights[f"{name}.weight"]), name
    assert torch.equal(forward(model), lora_out)


def test_adapters_side_by_side_are_weighted_and_removed_by_name():
    from lora import adapter_names, enable_lora, remove_lora

    model = tiny_model()
    base_out = forward(model)
    add_lora(model, "attn", r=2, alpha=2.0, adapter_name="a")
    add_lora(model, "all", r=3, alpha=1.0, adapter_name="b")
    randomise_lora(model)
    assert sorted(adapter_names(model)) == ["a", "b"]
    assert lora_layers(model)["mid_attn.block.attn1.Wq"].adapter_names == ["a", "b"]
    set_lora_weight(model, -0.5, name="b")

    def by_hand(names):  # the base with the named adapters' updates written into its weights
        fused = tiny_model()
        with torch.no_grad():
            for path, layer in lora_layers(model).items():
                for n in layer.adapter_names:
                    if n in names:
                        fused.get_submodule(path).weight.add_(layer.delta_weight(n))
        return forward(fused)
    torch.testing.assert_close(forward(model), by_hand("ab"), atol=1e-5, rtol=0)
    set_lora_weight(model, 0.0, name="b")
    only_a = forward(model)
    torch.testing.assert_close(only_a, by_hand("a"), atol=1e-5, rtol=0)
    set_lora_weight(model, 1.0, name="b")
    enable_lora(model, False, name="a")
    torch.testing.assert_close(forward(model), by_hand("b"), atol=1e-5, rtol=0)
    assert (forward(model) - base_out).abs().max().item() > 1e-3
    with pytest.raises(LoraError, match=r"no adapter named 'c'; it holds \['b', 'a'\]"):
        set_lora_weight(model, 1.0, name="c")
    with pytest.raises(LoraError, match="already holds an adapter named 'a'"):
        add_lora(model, "attn", r=2, alpha=2.0, adapter_name="a")
    remove_lora(model, "b")
    assert adapter_names(model) == ["a"] and len(lora_layers(model)) == 18  # the convs are plain again
    enable_lora(model, True, name="a")
    torch.testing.assert_close(forward(model), only_a, atol=1e-6, rtol=1e-5)
    remove_lora(model)
    assert not lora_layers(model) and torch.equal(forward(model), base_out)


def test_merge_honours_the_weight():
    model = tiny_model()
    add_lora(model, DEFAULT_TARGETS, r=2, alpha=2.0)
    randomise_lora(model)
    set_lora_weight(model, 0.5)
    half = forward(model)
    merge_lora(model)
    torch.testing.assert_close(forward(model), half, atol=1e-5, rtol=1e-5)


def test_merge_without_lora_raises():
    with pytest.raises(LoraError, match="no LoRA layers"):
        merge_lora(tiny_model())


# ------------------------------------------------------------------ training only LoRA

def test_only_lora_parameters_change_during_training():
    model = tiny_model().train()
    add_lora(model, DEFAULT_TARGETS, r=2, alpha=2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable, total = mark_only_lora_as_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == 2 * 18
    assert trainable == sum(p.numel() for p in params) and trainable < total / 10
    opt = torch.optim.AdamW(params, lr=1e-2)  # AdamW's default weight decay applies to whatever it is given
    x, t, labels = probe_inputs()
    for _ in range(3):
        loss = model(x, t, labels).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in after.items():
        if "lora_" in k:
            assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"


# ------------------------------------------------------------------ adapter files

def saved_adapter(tmp_path, model=None, name="adapter"):
    """A tiny model with a randomised adapter, saved; returns (model, path, fingerprint of its base)."""
    model = model or tiny_model()
    fingerprint = state_fingerprint(model.state_dict())
    layers = add_lora(model, DEFAULT_TARGETS, r=2, alpha=2.0)
    randomise_lora(model)
    path = str(tmp_path / name)
    write_adapter(path, adapter_from_model(model, Adapter({}, 2, 2.0, targets=list(layers),
                                                          base_fingerprint=fingerprint)))
    return model, path, fingerprint


def test_adapter_round_trip_onto_a_fresh_base(tmp_path):
    model, path, fingerprint = saved_adapter(tmp_path)
    expected = forward(model)
    fresh = tiny_model()
    assert (forward(fresh) - expected).abs().max().item() > 1e-3
    adapter = load_adapter(path)
    layers = apply_adapter(fresh, adapter, state_fingerprint(fresh.state_dict()))
    assert set(layers) == set(lora_layers(model))
    assert torch.equal(forward(fresh), expected)
    assert adapter.base_fingerprint == fingerprint and adapter.path == path


def test_adapter_folder_holds_only_lora_tensors_and_is_small(tmp_path, tiny_ckpt):
    from safetensors import safe_open

    model, path, fingerprint = saved_adapter(tmp_path)
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no training state unless asked for
    cfg = json.load(open(os.path.join(path, CONFIG_NAME)))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 2.0
    assert cfg["target_modules"] == list(lora_layers(model)) and cfg["use_rslora"] is False  # the modules, resolved
    with safe_open(os.path.join(path, WEIGHTS_NAME), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        a = f.get_tensor("base_model.model.mid_attn.block.attn2.Wk.lora_A.weight")
    assert len(keys) == 36 and all(k.startswith("base_model.model.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert meta["mnist_sd.base_fingerprint"] == fingerprint and meta["mnist_sd.format_version"] == "2"
    assert torch.equal(a, lora_layers(model)["mid_attn.block.attn2.Wk"].lora_A["default"].weight)  # PEFT's (r, in)
    assert set(load_adapter(path).tensors) == set(lora_state_dict(model))
    assert adapter_size(path) * 5 < os.path.getsize(tiny_ckpt)


def test_missing_adapter_raises_lora_error(tmp_path):
    path = tmp_path / "none"
    with pytest.raises(LoraError, match="not found") as e:
        load_adapter(str(path))
    assert str(path) in str(e.value)


def test_corrupt_adapter_raises_lora_error(tmp_path):
    _, path, _ = saved_adapter(tmp_path)
    weights = os.path.join(path, WEIGHTS_NAME)
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(LoraError, match="truncated or corrupt"):
        load_adapter(path)
    with open(weights, "wb") as f:  # one flipped bit in the tensor data: only the content hash sees it
        f.write(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    with pytest.raises(LoraError, match="corrupt: content hash differs"):
        load_adapter(path)


def test_base_checkpoint_is_not_an_adapter(tiny_ckpt):
    with pytest.raises(LoraError, match="not a LoRA adapter"):
        load_adapter(tiny_ckpt)


def test_adapter_for_another_base_needs_force(tmp_path):
    model, path, fingerprint = saved_adapter(tmp_path)
    other = tiny_model(seed=5)
    other_fp = state_fingerprint(other.state_dict())
    assert other_fp != fingerprint
    with pytest.raises(LoraError, match=f"trained on base {fingerprint}.*is {other_fp}.*--force"):
        apply_adapter(other, load_adapter(path), other_fp)
    forced = tiny_model(seed=5)
    apply_adapter(forced, load_adapter(path), other_fp, force=True)
    assert len(lora_layers(forced)) == 18
    for name, layer in lora_layers(forced).items():
        assert torch.equal(layer.lora_B["default"].weight, lora_layers(model)[name].lora_B["default"].weight)


def edit_config(path, **changes):
    cfg_path = os.path.join(path, CONFIG_NAME)
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def test_adapter_whose_rank_disagrees_with_its_tensors_is_refused(tmp_path):
    _, path, _ = saved_adapter(tmp_path)
    edit_config(path, r=3)
    with pytest.raises(LoraError, match="inconsistent with r=3"):
        load_adapter(path)


def test_adapter_with_other_targets_than_its_tensors_is_refused(tmp_path):
    _, path, fingerprint = saved_adapter(tmp_path)
    ad = load_adapter(path)
    with pytest.raises(LoraError, match=r"does not match targets \['Wq'\].*unexpected \[.*Wk") as e:
        apply_adapter(tiny_model(), ad.replace(targets=["Wq"]), fingerprint)
    assert "missing []" in str(e.value)
    edit_config(path, target_modules=["Wq"])  # in the file: refused on reading, before any model is built
    with pytest.raises(LoraError, match=r"field target_modules = \['Wq'\] names none of the modules \['down.*Wk'"):
        load_adapter(path)


def test_adapter_for_another_model_size_is_refused(tmp_path):
    _, path, _ = saved_adapter(tmp_path)
    bigger = UNet(preset_config(ModelConfig, "tiny", channels=(8, 32)))
    with pytest.raises(LoraError, match="shapes differ"):
        apply_adapter(bigger, load_adapter(path), "ignored", force=True)


# ------------------------------------------------------------------ lora_finetune.py

def test_finetune_adapter_matches_its_base(tiny_ckpt, tiny_adapter):
    base = torch.load(tiny_ckpt, weights_only=True)
    ad = load_adapter(tiny_adapter)
    assert ad.base_fingerprint == state_fingerprint(base["ema"])
    assert ad.base_path == str(tiny_ckpt) and ad.base_name == os.path.basename(tiny_ckpt)  # beside the fingerprint
    assert load_training_state(tiny_adapter).step == preset_config(LoraConfig, "tiny").lora_steps
    assert ad.r == 2 and ad.targets == resolve_targets(tiny_model(), DEFAULT_TARGETS) and ad.style == "italic"
    assert any(torch.count_nonzero(v) for k, v in ad.tensors.items() if k.endswith("lora_B"))  # it learned
    assert adapter_size(tiny_adapter) * 5 < os.path.getsize(tiny_ckpt)
    assert os.path.exists(os.path.join(tiny_adapter, STATE_NAME))  # beside the shared files, not in them


def run_finetune(ckpt, out, *extra):
    return lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", str(ckpt),
                               "--out", str(out), *extra])


def test_finetune_resume_continues_bit_identically(tmp_path, tiny_ckpt):
    run_finetune(tiny_ckpt, tmp_path / "straight", "--lora-steps", "4")
    run_finetune(tiny_ckpt, tmp_path / "split", "--lora-steps", "2")
    run_finetune(tiny_ckpt, tmp_path / "split", "--resume", "--lora-steps", "4")
    a, b = load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "split")
    assert load_training_state(tmp_path / "straight").step == load_training_state(tmp_path / "split").step == 4
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def to_old_layout(state):
    """A training state as fine-tunes saved it before the layers took PEFT's shapes: (in, r) / (r, out) tensors named
    M.lora_a / M.lora_b, and the optimizer's moments in that layout."""
    old = {k: v for k, v in state.items() if k not in ("layout", "content_sha256")}
    old["lora"] = {k.replace(".lora_A", ".lora_a").replace(".lora_B", ".lora_b"): v.T.contiguous()
                   for k, v in state["lora"].items()}
    old["optimizer"] = {**state["optimizer"], "state": {
        i: {k: v.T.contiguous() if v.dim() == 2 else v for k, v in s.items()}
        for i, s in state["optimizer"]["state"].items()}}
    return old


def test_a_training_state_of_the_old_layout_resumes_exactly(tmp_path, tiny_ckpt):
    """--resume converts a training state saved before the layers took PEFT's shapes, and goes on bit for bit."""
    run_finetune(tiny_ckpt, tmp_path / "straight", "--lora-steps", "4")
    run_finetune(tiny_ckpt, tmp_path / "split", "--lora-steps", "2")
    state_path = str(tmp_path / "split" / STATE_NAME)
    save_checkpoint(to_old_layout(load_checkpoint(state_path, kind="lora_state")), state_path)
    assert next(iter(load_checkpoint(state_path, kind="lora_state")["lora"])).endswith(".lora_a")
    run_finetune(tiny_ckpt, tmp_path / "split", "--resume", "--lora-steps", "4")
    a, b = load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "split")
    assert load_training_state(tmp_path / "split").step == 4
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def test_the_fine_tunes_t_range_defaults_by_style_and_a_flag_wins():
    """Bold draws t from 0..0.8 of T, italic and none from 0.2..0.8, unless --lora-t-range or the preset says."""
    assert LoraConfig().lora_t_range == LoraConfig(style="none").lora_t_range == (0.2, 0.8)
    assert LoraConfig(style="bold").lora_t_range == (0.0, 0.8)
    assert LoraConfig(style="bold", lora_t_range=(0.2, 0.8)).lora_t_range == (0.2, 0.8)
    parser = argparse.ArgumentParser()
    add_config_args(parser, LoraConfig)

    def parsed(*argv, preset="fast"):
        return config_from_args(parser.parse_args(list(argv)), LoraConfig, preset).lora_t_range
    assert parsed("--style", "bold") == (0.0, 0.8) and parsed() == (0.2, 0.8)
    assert parsed("--style", "bold", "--lora-t-range", "0.1,0.9") == (0.1, 0.9)
    assert parsed("--style", "bold", preset="tutorial") == (0.0, 1.0)  # the preset's own range wins


def test_a_bold_fine_tune_saves_its_t_range_and_resumes_with_it(tmp_path, tiny_ckpt):
    """The range the style chose is saved with the adapter; a resume carries on with the saved range, so an
    adapter trained before the default changed goes on as it began."""
    run_finetune(tiny_ckpt, tmp_path / "bold", "--style", "bold", "--lora-steps", "2")
    assert load_training_state(tmp_path / "bold").config["lora_t_range"] == (0.0, 0.8)
    run_finetune(tiny_ckpt, tmp_path / "old", "--style", "bold", "--lora-t-range", "0.2,0.8", "--lora-steps", "2")
    run_finetune(tiny_ckpt, tmp_path / "old", "--resume", "--lora-steps", "3")
    state = load_training_state(tmp_path / "old")
    assert state.step == 3 and state.config["lora_t_range"] == (0.2, 0.8)


def test_a_fine_tune_saved_before_the_t_range_setting_resumes_on_every_step(tmp_path, tiny_ckpt, tiny_adapter):
    """Fine-tunes saved before --lora-t-range existed drew t from all of 0..T-1: a resume goes on that way, not with
    today's default for its style."""
    out = tmp_path / "old"
    shutil.copytree(tiny_adapter, out)
    state = load_checkpoint(str(out / STATE_NAME), kind="lora_state")
    del state["config"]["lora_t_range"]
    save_checkpoint(state, str(out / STATE_NAME))
    steps = state["step"] + 1
    run_finetune(tiny_ckpt, out, "--resume", "--lora-steps", str(steps))
    resumed = load_training_state(out)
    assert resumed.step == steps and resumed.config["lora_t_range"] == (0.0, 1.0)


def files_in(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


@pytest.mark.parametrize("flag,value,saved", [("--r", "3", "2"), ("--targets", "Wq", "['Wq', 'Wk', 'Wv']"),
                                              ("--style", "bold", "italic")])
def test_finetune_resume_with_contradicting_flags_exits_2(tmp_path, tiny_ckpt, tiny_adapter, capsys, flag, value,
                                                         saved):
    out = tmp_path / "lora"
    shutil.copytree(tiny_adapter, out)
    before = files_in(out)
    with pytest.raises(SystemExit) as e:
        run_finetune(tiny_ckpt, out, "--resume", flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "contradicts adapter" in err and f"(trained with {saved})" in err
    assert files_in(out) == before


@pytest.mark.parametrize("args,message", [
    (["--r", "0"], "r must be > 0, got 0"),
    (["--targets", "foo"], "match no nn.Linear"),
    (["--style", "wavy"], "style must be one of none, italic, bold"),
])
def test_finetune_bad_flags_exit_2(tmp_path, tiny_ckpt, capsys, args, message):
    out = tmp_path / "lora"
    with pytest.raises(SystemExit) as e:
        run_finetune(tiny_ckpt, out, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_finetune_on_a_missing_base_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_finetune(tmp_path / "no_ckpt.pt", tmp_path / "lora")
    assert e.value.code == 2
    assert "not found" in capsys.readouterr().err


# ------------------------------------------------------------------ the style data

@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist-5k", "test").images  # 500 real digits, 50 per class


def test_italic_style_slants_the_digits(digits):
    styled = apply_style(digits, "italic")
    assert styled.shape == digits.shape and styled.dtype == torch.uint8
    before, after = slant(digits).mean().item(), slant(styled).mean().item()
    assert after - before > 0.2  # a shear of 0.3 adds about 0.3 to mu11 / mu02
    assert abs(ink(styled).mean().item() - ink(digits).mean().item()) < 0.01  # a shear keeps the ink


def test_bold_style_adds_ink(digits):
    styled = apply_style(digits, "bold")
    assert ink(styled).mean().item() > 1.5 * ink(digits).mean().item()
    assert abs(slant(styled).mean().item() - slant(digits).mean().item()) < 0.05
    assert torch.all(styled >= digits)  # a max filter never removes ink


def test_none_style_is_the_identity(digits):
    assert torch.equal(apply_style(digits, "none"), digits)
    with pytest.raises(ValueError, match="unknown style"):
        apply_style(digits, "wavy")


def test_slant_of_a_known_shape():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    for i in range(20):  # a stroke from bottom-left to top-right: x grows as y goes up
        img[0, 24 - i, 4 + i] = 255
    assert slant(img).item() == pytest.approx(1.0, abs=1e-5)
    assert slant(img.flip(-1)).item() == pytest.approx(-1.0, abs=1e-5)
