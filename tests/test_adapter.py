"""Adapter files against the real PEFT, kohya's layout, several adapters at once, and lora_tools.py.

As in test_lora.py, every equivalence uses a non-zero B, and alpha differs from r, so a
wrong scale or a missing transpose shows. Conv2d adapters (targets "all") go through every format and tool too.
"""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

import denoise
import lora_tools
from adapter import (Adapter, TrainingState, adapter_from_model, apply_adapter, attach_adapters, resolve_kohya_names,
                     set_weights)
from adapter_formats import (CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, load_adapter, load_adapters, write_adapter,
                             write_kohya)
from checkpoint import CHECKPOINT_VERSION, save_checkpoint, state_fingerprint
from cli import lora_spec
from config import ModelConfig, preset_config
from lora import LoraError, add_lora, lora_layers, merge_lora, unmerge_lora
from unet import UNet

TARGETS = ("Wq", "Wk", "Wv")
R, ALPHA = 2, 3.0  # alpha != r: the scale alpha / r = 1.5 must travel with the file


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return UNet(preset_config(ModelConfig, "tiny")).eval()


def probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn((3, 1, 28, 28), generator=g), torch.tensor([0, 25, 49]), torch.tensor([1, 5, 10])


def forward(model):
    with torch.no_grad():
        return model(*probe())


def randomise(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.adapter_names:
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def trained_adapter(tmp_path, name="ad", seed=1, base_seed=0, r=R, alpha=ALPHA, targets=TARGETS):
    """A randomised adapter on the tiny base, saved as a PEFT folder; returns (folder, fingerprint)."""
    model = tiny_model(base_seed)
    fingerprint = state_fingerprint(model.state_dict())
    layers = add_lora(model, targets, r, alpha)
    randomise(model, seed)
    path = str(tmp_path / name)
    write_adapter(path, adapter_from_model(model, Adapter({}, r, alpha, targets=list(layers), style="italic",
                                                          base_fingerprint=fingerprint)))
    return path, fingerprint


def with_adapters(specs, force=False):
    model = tiny_model()
    adapters = load_adapters([lora_spec(s) for s in specs], log=lambda _: None)
    attach_adapters(model, adapters, state_fingerprint(model.state_dict()), force)
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ the real PEFT

@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft", reason="the PEFT checks need requirements-dev.txt")


@pytest.mark.parametrize("targets", [TARGETS, ("all",)])
def test_peft_loads_our_folder_with_our_outputs(tmp_path, peft, targets):
    """A Linear-only adapter and one on every Linear and Conv2d (A a k x k conv, B 1x1): PEFT rebuilds the same."""
    path, _ = trained_adapter(tmp_path, targets=targets)
    if targets == ("all",):
        shapes = {k: tuple(v.shape) for k, v in load_adapter(path).tensors.items()}
        assert shapes["mid1.conv1.lora_A"] == (R, 16, 3, 3) and shapes["mid1.conv1.lora_B"] == (16, R, 1, 1)
    ours = forward(with_adapters([path]))
    theirs = peft.PeftModel.from_pretrained(tiny_model(), path).eval()
    if targets == ("all",):
        assert type(theirs.get_submodule("base_model.model.mid1.conv1")).__name__ == "Conv2d"  # PEFT's LoRA Conv2d
    assert max_diff(ours, forward(tiny_model())) > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(forward(theirs), ours, atol=1e-5, rtol=0)


def peft_written(tmp_path, peft):
    """An adapter that PEFT's own save_pretrained wrote for our UNet, with a non-zero B."""
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    path = str(tmp_path / "peft")
    model.save_pretrained(path)
    return model, path


def test_a_folder_peft_wrote_loads_into_ours(tmp_path, peft):
    model, path = peft_written(tmp_path, peft)
    expected = forward(model)
    ad = load_adapter(path)
    assert ad.format == "peft" and ad.r == R and ad.alpha == ALPHA and ad.base_fingerprint is None
    ours = tiny_model()
    with pytest.raises(LoraError, match="does not say which base"):  # PEFT records no base: --force
        apply_adapter(ours, ad, state_fingerprint(ours.state_dict()))
    ours = tiny_model()
    apply_adapter(ours, ad, state_fingerprint(ours.state_dict()), force=True)
    assert max_diff(expected, forward(tiny_model())) > 1e-3
    torch.testing.assert_close(forward(ours), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [TARGETS, ("all",)])
def test_merged_outputs_agree_with_peft_merge_and_unload(tmp_path, peft, targets):
    path, _ = trained_adapter(tmp_path, targets=targets)
    theirs = peft.PeftModel.from_pretrained(tiny_model(), path).merge_and_unload().eval()
    ours = with_adapters([path])
    merge_lora(ours)
    torch.testing.assert_close(forward(ours), forward(theirs), atol=1e-5, rtol=0)
    for name in load_adapter(path).modules:
        torch.testing.assert_close(ours.get_submodule(name).weight, theirs.get_submodule(name).weight, atol=1e-6,
                                   rtol=0)


# ------------------------------------------------------------------ the files

def test_training_state_lives_beside_the_shared_file(tmp_path):
    path, _ = trained_adapter(tmp_path)
    ad = load_adapter(path)
    write_adapter(path, ad, TrainingState(ad.tensors, {}, {}, 3))
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME, STATE_NAME]
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(path):  # the usual permissions, not a temporary file's private ones
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o666 & ~umask, name
    write_adapter(path, ad)  # a new adapter in the same place: the old state is not left to pair with it
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary folder left
    back = load_adapter(path)
    assert all(torch.equal(back.tensors[k], v) for k, v in ad.tensors.items())


def test_the_same_adapter_gives_the_same_bytes(tmp_path):
    """safetensors keeps its header's metadata in a hash map, in a new order each run; ours are sorted."""
    path, _ = trained_adapter(tmp_path)
    ad = load_adapter(path)
    write_adapter(tmp_path / "again", ad)
    assert (tmp_path / "again" / WEIGHTS_NAME).read_bytes() == open(os.path.join(path, WEIGHTS_NAME), "rb").read()


def test_config_and_tensors_from_two_saves_are_refused(tmp_path):
    path, _ = trained_adapter(tmp_path)
    cfg = json.load(open(os.path.join(path, CONFIG_NAME)))
    json.dump(dict(cfg, lora_alpha=8.0), open(os.path.join(path, CONFIG_NAME), "w"))
    with pytest.raises(LoraError, match="different saves"):
        load_adapter(path)


def test_legacy_pt_loads_and_converts(tmp_path, capsys):
    model = tiny_model()
    fingerprint = state_fingerprint(model.state_dict())
    add_lora(model, TARGETS, R, ALPHA)
    randomise(model)
    old = str(tmp_path / "lora.pt")
    # format 1: our own (in, r) and (r, out) tensors, named M.lora_a and M.lora_b
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_a"] = layer.lora_A["default"].weight.detach().T.contiguous()
        tensors[f"{name}.lora_b"] = layer.lora_B["default"].weight.detach().T.contiguous()
    save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "lora", "r": R, "alpha": ALPHA, "targets": list(TARGETS),
                     "base_fingerprint": fingerprint, "style": "italic", "optimizer": {}, "lora": tensors}, old)
    expected = forward(model)
    assert load_adapter(old).format == "legacy-pt"
    torch.testing.assert_close(forward(with_adapters([old])), expected, atol=0, rtol=0)
    lora_tools.main(["convert", old, str(tmp_path / "new")])
    assert "max |difference| of the tensors 0" in capsys.readouterr().out
    new = load_adapter(tmp_path / "new")
    assert new.format == "peft" and new.style == "italic" and new.base_fingerprint == fingerprint
    torch.testing.assert_close(forward(with_adapters([str(tmp_path / "new")])), expected, atol=0, rtol=0)


@pytest.mark.parametrize("targets", [TARGETS, ("all",)])
def test_kohya_round_trip_keeps_alpha_and_names(tmp_path, targets):
    from safetensors import safe_open

    path, _ = trained_adapter(tmp_path, targets=targets)
    ad = load_adapter(path)
    kohya = str(tmp_path / "k.safetensors")
    write_kohya(kohya, ad)
    with safe_open(kohya, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_mid_attn_block_attn1_Wq.alpha")
    assert "lora_unet_mid_attn_block_attn1_Wq.lora_down.weight" in keys and alpha.dim() == 0 and alpha == ALPHA
    assert meta["ss_network_dim"] == str(R) and float(meta["ss_network_alpha"]) == ALPHA
    if targets == ("all",):  # a conv: lora_down k x k, lora_up 1x1, as kohya's LoCon writes them
        with safe_open(kohya, "pt") as f:
            assert f.get_tensor("lora_unet_mid1_conv1.lora_down.weight").shape == (R, 16, 3, 3)
            assert f.get_tensor("lora_unet_mid1_conv1.lora_up.weight").shape == (16, R, 1, 1)
    back = resolve_kohya_names(load_adapter(kohya), tiny_model())
    assert back.alpha == ALPHA and back.modules == ad.modules
    assert all(torch.equal(back.tensors[k], v) for k, v in ad.tensors.items())  # exact
    torch.testing.assert_close(forward(with_adapters([kohya])), forward(with_adapters([path])), atol=0, rtol=0)


def test_kohya_without_alpha_assumes_rank(tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = trained_adapter(tmp_path)
    kohya = str(tmp_path / "k.safetensors")
    write_kohya(kohya, load_adapter(path))
    save_file({k: v for k, v in load_file(kohya).items() if not k.endswith(".alpha")}, kohya)
    ad = load_adapter(kohya)
    assert ad.alpha == ad.r == R and any("assumed alpha = rank" in n for n in ad.notes)


def test_kohya_names_that_two_modules_share_are_refused(tmp_path):
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.a_b = nn.ModuleDict({"c": nn.Linear(4, 4)})
            self.a = nn.ModuleDict({"b_c": nn.Linear(4, 4)})

    tensors = {"a_b.c.lora_A": torch.ones(1, 4), "a_b.c.lora_B": torch.ones(4, 1)}
    kohya = str(tmp_path / "k.safetensors")
    write_kohya(kohya, Adapter(tensors, 1, 1.0))
    with pytest.raises(LoraError, match="ambiguous.*a_b.c or a.b_c|ambiguous.*a.b_c or a_b.c"):
        resolve_kohya_names(load_adapter(kohya), Clash())


# ------------------------------------------------------------------ several adapters

def test_two_adapters_add_up_with_their_weights(tmp_path):
    a, _ = trained_adapter(tmp_path, "a", seed=1)
    b, _ = trained_adapter(tmp_path, "b", seed=2, r=3, alpha=1.0, targets=("Wq", "Wv"))
    base = tiny_model()
    expected = tiny_model()
    with torch.no_grad():  # W + 0.8 dA + (-0.5) dB, written into the weights by hand
        for ad, w in ((load_adapter(a), 0.8), (load_adapter(b), -0.5)):
            for m, d in ad.delta_weights().items():
                expected.get_submodule(m).weight.add_(w * d)
    model = with_adapters([f"{a}:0.8", f"{b}:-0.5"])
    assert max_diff(forward(model), forward(base)) > 1e-3
    torch.testing.assert_close(forward(model), forward(expected), atol=1e-5, rtol=0)
    # named after their folders, side by side in one LoraLayer a layer
    layer = lora_layers(model)["mid_attn.block.attn1.Wq"]
    assert layer.adapter_names == ["a", "b"] and layer.weights == {"a": 0.8, "b": -0.5}
    assert {"mid_attn.block.attn1.Wq.lora_A.a.weight", "mid_attn.block.attn1.Wq.lora_A.b.weight"} <= set(
        model.state_dict())


def test_fuse_with_a_weight_and_unfuse_exactly(tmp_path):
    a, _ = trained_adapter(tmp_path, "a", seed=1)
    b, _ = trained_adapter(tmp_path, "b", seed=2, targets=("all",))
    model = tiny_model()
    adapters = load_adapters([lora_spec(f"{a}:0.8"), lora_spec(f"{b}:0.5")], log=lambda _: None)
    attach_adapters(model, adapters, state_fingerprint(model.state_dict()))
    base = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    set_weights(model, adapters, 0.5)  # every adapter at half its weight
    assert lora_layers(model)["mid_attn.block.attn1.Wq"].weights == {"a": 0.4, "b": 0.25}
    assert lora_layers(model)["mid1.conv1"].weights == {"b": 0.25}
    unmerged = forward(model)
    merged = merge_lora(model)
    assert not lora_layers(model) and {"mid1.conv1", "mid_attn.block.attn1.Wq"} <= set(merged)
    torch.testing.assert_close(forward(model), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model, merged)
    for name, layer in merged.items():  # every base weight bit for bit
        assert torch.equal(layer.base_layer.weight, base[f"{name}.weight"]), name
    assert torch.equal(forward(model), unmerged)


def test_unfusing_what_changed_after_fusing_is_refused(tmp_path):
    a, _ = trained_adapter(tmp_path, "a")
    model = with_adapters([a])
    merged = merge_lora(model)
    with torch.no_grad():
        model.get_submodule("mid_attn.block.attn1.Wq").weight.add_(1.0)  # trained after merging
    with pytest.raises(LoraError, match="cannot unmerge mid_attn.block.attn1.Wq: its merged weight was modified"):
        unmerge_lora(model, merged)
    model = with_adapters([a])
    merged = merge_lora(model)
    apply_adapter(model, load_adapter(a), state_fingerprint(tiny_model().state_dict()))  # on top of the fused
    with pytest.raises(LoraError, match="replaced after merging"):
        unmerge_lora(model, merged)


def test_a_mismatched_base_names_the_file_it_was_trained_on(tmp_path, monkeypatch):
    # the hint also looks for out/<base name> in the working folder: after the quick start, ours has one
    monkeypatch.chdir(tmp_path)
    base_path = tmp_path / "ckpt.pt"
    base_path.write_bytes(b"stands for the base")
    path, fingerprint = trained_adapter(tmp_path)
    write_adapter(path, load_adapter(path).replace(base_path=str(base_path), base_name="ckpt.pt"))
    other = tiny_model(seed=5)
    with pytest.raises(LoraError, match=f"trained on base {fingerprint} \\({base_path}, which is here: pass --ckpt "):
        apply_adapter(other, load_adapter(path), state_fingerprint(other.state_dict()))
    base_path.unlink()
    with pytest.raises(LoraError, match=f"trained on base {fingerprint} \\(recorded as {base_path}\\), but"):
        apply_adapter(other, load_adapter(path), state_fingerprint(other.state_dict()))


def test_adapters_of_two_bases_are_refused(tmp_path):
    a, _ = trained_adapter(tmp_path, "a")
    b, _ = trained_adapter(tmp_path, "b", base_seed=7)
    with pytest.raises(LoraError, match="trained on different bases"):
        with_adapters([a, b])


@pytest.mark.parametrize("spec,message", [("x:abc", "'abc' is not a number"), ("x:nan", "finite number"),
                                          ("x:inf", "finite number"), ("x:-inf", "finite number"),
                                          ("x:1e308", "from -10 to 10, got 1e+308"), ("x:-10.5", "from -10 to 10")])
def test_a_weight_that_is_not_a_number_is_refused_while_parsing(spec, message, capsys):
    with pytest.raises(SystemExit) as e:
        denoise.parse_args(["--lora", spec])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--lora {spec!r}: " in err and message in err


def test_lora_spec_default_weight_and_colons(tmp_path):
    assert lora_spec("out/lora") == ("out/lora", 1.0, "out/lora", "")
    assert lora_spec("out/lora:-0.5")[:2] == ("out/lora", -0.5) and str(lora_spec("out/lora:-0.5")) == "out/lora:-0.5"
    assert lora_spec("out/lora:10")[:2] == ("out/lora", 10.0)  # the bound itself is allowed
    colon = tmp_path / "a:b"
    colon.mkdir()
    assert lora_spec(str(colon)) == (str(colon), 1.0, str(colon), "")  # a path with a colon in it, taken whole
    assert denoise.parse_args(["--lora"]).lora == [("out/lora", 1.0, "out/lora", "")]  # the default, parsed too


def test_denoise_with_two_weighted_adapters(tiny_ckpt, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--ckpt", tiny_ckpt, "--out-dir", str(out), "--steps", "2", "--frames", "0", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        denoise.main(args + ["--lora", f"{tiny_adapter}:nan"])
    assert e.value.code == 2 and "finite number" in capsys.readouterr().err and not out.exists()
    written = denoise.main(args + ["--lora", f"{tiny_adapter}:0.8", "--lora", f"{tiny_adapter}:-0.3", "--merge"])
    assert all(os.path.exists(p) for p in written)


# ------------------------------------------------------------------ bad files

def test_a_file_whose_keys_match_nothing_of_ours(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({"text_model.encoder.layers.0.weight": torch.ones(2, 2)}, path)
    with pytest.raises(LoraError, match="match neither PEFT's layout"):
        load_adapter(path)
    save_file({"lora_unet_down_blocks_0_attn_to_q.lora_down.weight": torch.ones(1, 4),
               "lora_unet_down_blocks_0_attn_to_q.lora_up.weight": torch.ones(4, 1)}, path)
    with pytest.raises(LoraError, match="none of its 1 modules match this model"):
        resolve_kohya_names(load_adapter(path), tiny_model())


@pytest.mark.parametrize("change,message", [({"use_dora": True}, "use_dora.*not supported"),
                                            ({"peft_type": "LOHA"}, "'LOHA' adapter, not LoRA"),
                                            ({"bias": "all"}, "bias")])
def test_peft_configs_we_cannot_honour(tmp_path, change, message):
    path, _ = trained_adapter(tmp_path)
    cfg = json.load(open(os.path.join(path, CONFIG_NAME)))
    json.dump(dict(cfg, **change), open(os.path.join(path, CONFIG_NAME), "w"))
    with pytest.raises(LoraError, match=message):
        load_adapter(path)


def test_a_target_the_model_lacks(tmp_path):
    path, fingerprint = trained_adapter(tmp_path)
    cfg = json.load(open(os.path.join(path, CONFIG_NAME)))
    json.dump(dict(cfg, target_modules=["Wq", "Wk", "Wv", "to_q"]), open(os.path.join(path, CONFIG_NAME), "w"))
    with pytest.raises(LoraError, match=r"targets \['to_q'\], which this model lacks"):
        apply_adapter(tiny_model(), load_adapter(path), fingerprint)


def test_non_finite_tensors_are_refused(tmp_path):
    path, _ = trained_adapter(tmp_path)
    ad = load_adapter(path)
    key = next(iter(ad.tensors))
    ad.tensors[key] = ad.tensors[key].clone().fill_(float("nan"))
    write_adapter(path, ad)
    with pytest.raises(LoraError, match="NaN or infinite"):
        load_adapter(path)


# ------------------------------------------------------------------ lora_tools.py

def run_tools(*args):
    return lora_tools.main([str(a) for a in args])


@pytest.mark.parametrize("targets", [("Wq", "Wv"), ("all",)])
def test_merge_cat_is_exact_and_svd_reports_the_kept_share(tmp_path, capsys, targets):
    a, _ = trained_adapter(tmp_path, "a", seed=1)
    b, _ = trained_adapter(tmp_path, "b", seed=2, r=3, alpha=1.0, targets=targets)
    stacked = forward(with_adapters([f"{a}:0.8", f"{b}:0.5"]))
    run_tools("merge", f"{a}:0.8", f"{b}:0.5", "--out", tmp_path / "cat")
    cat = load_adapter(tmp_path / "cat")
    assert cat.r == R + 3 and cat.base_fingerprint == load_adapter(a).base_fingerprint
    torch.testing.assert_close(forward(with_adapters([str(tmp_path / "cat")])), stacked, atol=1e-5, rtol=0)
    run_tools("merge", f"{a}:0.8", f"{b}:0.5", "--out", tmp_path / "svd5", "--mode", "svd", "--rank", "5")
    assert "kept 100.00%" in capsys.readouterr().out
    torch.testing.assert_close(forward(with_adapters([str(tmp_path / "svd5")])), stacked, atol=1e-5, rtol=0)
    run_tools("merge", f"{a}:0.8", f"{b}:0.5", "--out", tmp_path / "svd1", "--mode", "svd", "--rank", "1")
    out = capsys.readouterr().out
    share = float(out.split("kept ")[1].split("%")[0])
    assert 30 < share < 100


@pytest.mark.parametrize("targets", [TARGETS, ("all",)])
def test_resize_keeps_the_strength(tmp_path, capsys, targets):
    path, _ = trained_adapter(tmp_path, r=4, alpha=6.0, targets=targets)
    run_tools("resize", path, "--rank", "4", "--out", tmp_path / "same")
    assert "kept 100.00%" in capsys.readouterr().out
    torch.testing.assert_close(forward(with_adapters([str(tmp_path / "same")])), forward(with_adapters([path])),
                               atol=1e-5, rtol=0)
    run_tools("resize", path, "--rank", "2", "--out", tmp_path / "r2")
    small = load_adapter(tmp_path / "r2")
    assert small.r == 2 and small.alpha == pytest.approx(3.0)  # alpha / r stays 1.5
    if targets == ("all",):
        assert small.tensors["mid1.conv1.lora_A"].shape == (2, 16, 3, 3)
    assert 50 < float(capsys.readouterr().out.split("kept ")[1].split("%")[0]) < 100


@pytest.mark.parametrize("targets", ["attn", "all"])
def test_extract_recovers_a_low_rank_fine_tune(tmp_path, capsys, targets):
    base = tiny_model()
    config = {"model": dataclasses.asdict(preset_config(ModelConfig, "tiny")), "diffusion": {}}
    base_path, tuned_path = str(tmp_path / "base.pt"), str(tmp_path / "tuned.pt")
    save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "base", "model": base.state_dict(),
                     "ema": base.state_dict(), "config": config, "step": 0}, base_path)
    tuned = tiny_model()
    g = torch.Generator().manual_seed(4)
    from lora import resolve_targets

    with torch.no_grad():  # a rank-2 change of every targeted weight; a conv's as its (out, in k k) matrix
        for n in resolve_targets(tuned, targets):
            w = tuned.get_submodule(n).weight
            change = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g) * 0.05
            w.add_(change.view(w.shape))
    save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "base", "model": tuned.state_dict(),
                     "ema": tuned.state_dict(), "config": config, "step": 0}, tuned_path)
    run_tools("extract", "--tuned", tuned_path, "--base", base_path, "--rank", "2", "--targets", targets,
              "--from", "ema", "--out", tmp_path / "x")
    out = capsys.readouterr().out
    assert "kept 100.00%" in out and "hold 100.0%" in out
    ad = load_adapter(tmp_path / "x")
    assert ad.r == 2 and ad.base_fingerprint == state_fingerprint(base.state_dict()) and ad.base_path == base_path
    assert ad.targets == resolve_targets(base, targets)
    torch.testing.assert_close(forward(with_adapters([str(tmp_path / "x")])), forward(tuned), atol=1e-5, rtol=0)


def test_info_says_what_a_file_holds(tmp_path, capsys):
    path, fingerprint = trained_adapter(tmp_path)
    run_tools("info", path, "--ckpt", tmp_path / "none.pt")
    out = capsys.readouterr().out
    assert "format peft, rank 2, alpha 3" in out and fingerprint in out and "style italic" in out
    assert "mid_attn.block.attn1.Wq" in out and "bytes" in out


@pytest.mark.parametrize("args,message", [
    (["resize", "{a}", "--rank", "5", "--out", "{out}"], "larger than the adapter's rank 2"),
    (["merge", "{a}", "{a}", "--mode", "svd", "--rank", "100", "--out", "{out}"], "larger than layer"),
    (["merge", "{a}", "{a}:abc", "--out", "{out}"], "'abc' is not a number"),
    (["merge", "{a}", "{other}", "--out", "{out}"], "different bases"),
    (["resize", "{a}", "--rank", "0", "--out", "{out}"], "--r must be > 0"),  # --rank: the alias of --r
])
def test_tools_refuse_bad_input_with_one_line_and_write_nothing(tmp_path, capsys, args, message):
    a, _ = trained_adapter(tmp_path, "a")
    other, _ = trained_adapter(tmp_path, "other", base_seed=7)
    out = tmp_path / "result"
    with pytest.raises(SystemExit) as e:
        run_tools(*[x.format(a=a, other=other, out=out) for x in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_grid_of_two_adapters(tiny_ckpt, tiny_adapter, tmp_path):
    from PIL import Image

    second = tmp_path / "second"
    write_adapter(second, load_adapter(tiny_adapter).replace(style="bold"))
    out = tmp_path / "grid.png"
    run_tools("grid", tiny_adapter, second, "--ckpt", tiny_ckpt, "--weights", "0,1", "--steps", "2",
              "--device", "cpu", "--precision", "fp32", "--out", out)
    with Image.open(out) as im:
        assert im.size[0] > 100


def test_full_fine_tune_writes_a_base_checkpoint_that_extract_reads(tiny_ckpt, tmp_path, capsys):
    import lora_finetune
    from checkpoint import load_model

    full = tmp_path / "full.pt"
    common = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", tiny_ckpt]
    lora_finetune.main(common + ["--full", "--out", str(full)])
    tuned, ckpt = load_model(str(full))
    base, base_ckpt = load_model(tiny_ckpt)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any(k.endswith("Wo.weight") for k in changed) and any(".ff." in k for k in changed)  # every weight trains
    assert ckpt["fine_tune"]["base_fingerprint"] == state_fingerprint(base_ckpt["ema"])
    assert ckpt["fine_tune"]["config"]["lora_lr"] == lora_finetune.FULL_LR == 3e-4  # not LoRA's 1e-2
    run_tools("extract", "--tuned", full, "--base", tiny_ckpt, "--rank", "2", "--out", tmp_path / "x")
    assert load_adapter(tmp_path / "x").base_fingerprint == state_fingerprint(base_ckpt["ema"])
    with pytest.raises(SystemExit) as e:
        lora_finetune.main(common + ["--full", "--resume", "--out", str(tmp_path / "again.pt")])
    assert e.value.code == 2 and "--full cannot --resume" in capsys.readouterr().err
