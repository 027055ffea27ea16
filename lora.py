"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") for the UNet's attention.

A frozen ``nn.Linear`` computing x W^T + b gets a trainable low-rank path:

    y = net(x) + (x @ lora_a @ lora_b) * alpha / r * scale        lora_a: (in, r), lora_b: (r, out)

lora_b starts at zero, so the adapter is a no-op at step 0 (as in loralib). Parameter names start
with ``lora_``: that prefix is the contract freezing and saving rely on.

    layers = add_lora(model, targets=("Wq", "Wk", "Wv"), r=4, alpha=4)
    mark_only_lora_as_trainable(model)
    apply_adapter(model, adapter, base_fingerprint)  # an adapter dict (adapter.py reads and writes the files)
    merged = merge_lora(model)                     # plain nn.Linear layers again: zero inference overhead
    unmerge_lora(model, merged)                    # the exact base weights back

Several adapters stack: applying a second one wraps the first one's LoraLayer in another
(``net`` of the outer layer is the inner LoraLayer), so each keeps its own tensors, name, alpha / r
and weight, and the outputs add up. The newest adapter is outermost and keeps the plain key names
(``...Wq.lora_a``); a single adapter, as training uses, has exactly the keys it always had.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from errors import UserError


class LoraError(UserError):
    """An adapter that does not fit the model, or targets that match nothing: the message says what differs."""


class BaseMismatch(LoraError):
    """An adapter trained on other base weights than the ones given; ``trained_on`` is its base's fingerprint."""

    def __init__(self, message, trained_on, path):
        super().__init__(message)
        self.trained_on, self.path = trained_on, path


class LoraLayer(nn.Module):
    def __init__(self, target_linear_layer, feature_in, feature_out, r, alpha, dropout=0.0):
        super().__init__()
        if r <= 0:
            raise LoraError(f"LoRA rank r must be > 0, got {r}")
        self.net = target_linear_layer  # the frozen base layer
        self.r = r
        self.alpha = alpha
        self.scale = 1.0  # runtime multiplier of the update: 0 turns the adapter off, 1 is as trained
        self.adapter_name = "default"  # tells stacked adapters apart
        self.adapter_weight = 1.0  # this adapter's strength among several; set_lora_scale multiplies it in
        self.lora_a = nn.Parameter(torch.empty(feature_in, r))
        self.lora_b = nn.Parameter(torch.zeros(r, feature_out))  # zero: the adapter starts as a no-op
        # Kaiming-uniform with fan_in = feature_in, as nn.Linear and loralib initialise their A
        nn.init.kaiming_uniform_(self.lora_a.T, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def base_layer(self):
        """The nn.Linear at the bottom of a stack of LoraLayers."""
        return self.net.base_layer if isinstance(self.net, LoraLayer) else self.net

    def delta_weight(self):
        """The update in nn.Linear's (out, in) layout, in fp32: (A B)^T * alpha / r * scale."""
        return (self.lora_a.float() @ self.lora_b.float()).T * (self.alpha / self.r * self.scale)

    def forward(self, x):
        if self.scale == 0:
            return self.net(x)
        s = self.alpha / self.r * self.scale
        if (isinstance(self.net, nn.Linear) and not (torch.is_grad_enabled() and self.lora_a.requires_grad)
                and (not self.training or isinstance(self.dropout, nn.Identity))):
            # Not training the adapter: fold it into the weight for this call, W + s (A B)^T, one small addmm
            # of the weight's size, then the base's own linear. The low-rank path below costs two skinny
            # products over every token (N x in x r), which on a CPU took longer than the linear itself.
            w = torch.addmm(self.net.weight, self.lora_b.T, self.lora_a.T, alpha=s)  # (out, in)
            return nn.functional.linear(x, w, self.net.bias)
        out = self.net(x)
        h = x if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        # out + s (x A) B with the scale and the sum in one addmm: two kernels instead of four (matmul,
        # matmul, mul, add); the gradients of A and B stay low-rank products
        xa = h.reshape(-1, h.shape[-1]) @ self.lora_a  # (N, r)
        return torch.addmm(out.reshape(-1, out.shape[-1]), xa, self.lora_b, alpha=s).view(out.shape)


def inject_lora(module, name, target_linear_layer, r=4, alpha=4.0, dropout=0.0):
    """Replace the sub-module at dotted path ``name`` by a LoraLayer wrapping it (the tutorial's helper).

    The target may itself be a LoraLayer: the new adapter then stacks on top of the old one."""
    base = target_linear_layer.base_layer if isinstance(target_linear_layer, LoraLayer) else target_linear_layer
    layer = LoraLayer(target_linear_layer, base.in_features, base.out_features, r, alpha, dropout)
    layer.to(base.weight.device)
    _set_submodule(module, name, layer)
    return layer


def add_lora(model, targets=("Wq", "Wk", "Wv"), r=4, alpha=4.0, dropout=0.0, adapter_name="default"):
    """Wrap every nn.Linear whose last name part (or whole dotted name) is in ``targets``; returns {name: LoraLayer}.

    A layer that already has an adapter gets a second one stacked on it.

    Names are collected first and replaced afterwards: editing a module while iterating over
    named_modules() skips or revisits layers (the tutorial's loop did)."""
    targets = tuple(targets)
    names = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, LoraLayer)) and (n.split(".")[-1] in targets or n in targets)
             and not _inside_lora(n)]
    if not names:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LoraError(f"LoRA targets {list(targets)} match no nn.Linear in the model; "
                        f"linear layer names are {linear}")
    layers = {n: inject_lora(model, n, m, r, alpha, dropout) for n, m in names}
    for layer in layers.values():
        layer.adapter_name = adapter_name
    return layers


def _inside_lora(name):
    return name.endswith(".net") or ".net." in name


def _lora_shapes(model, targets, r):
    """{M.lora_a: (in, r), M.lora_b: (r, out)} for every linear layer M that ``targets`` names in ``model``."""
    shapes = {}
    for n, m in model.named_modules():
        if _inside_lora(n) or not any(n == t or n.split(".")[-1] == t for t in targets):
            continue
        while isinstance(m, LoraLayer):
            m = m.net
        if isinstance(m, nn.Linear):
            shapes[f"{n}.lora_a"], shapes[f"{n}.lora_b"] = (m.in_features, r), (r, m.out_features)
    return shapes


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def set_lora_scale(model, scale):
    """Every adapter's runtime scale: ``scale`` times its own weight (1 unless set by apply_adapter)."""
    for layer in lora_layers(model).values():
        layer.scale = float(scale) * layer.adapter_weight


def mark_only_lora_as_trainable(model):
    """Freeze every parameter whose name lacks ``lora_``; returns (trainable, total) parameter counts."""
    trainable = total = 0
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def lora_state_dict(model):
    """Only the lora_ tensors (a few KB), detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}


# ------------------------------------------------------------ applying adapters

def apply_adapter(model, adapter, base_fingerprint, force=False, name="default", weight=1.0, force_flag="--force"):
    """Inject LoRA as the adapter describes and load its tensors, checking base, keys and shapes.

    ``force`` overrides only the base-fingerprint check (an adapter trained on another base
    usually still loads, but its effect is unpredictable); keys and shapes are always checked.
    On a model that already has adapters this one stacks on top, named ``name`` at ``weight``.
    ``force_flag`` is the caller's flag that sets ``force``, named in the messages (None: it has none)."""
    path = adapter.get("path") or "adapter"
    targets = adapter["targets"] or adapter["modules"]
    # sizes first: an adapter for a base of another size is that, whatever its fingerprint says
    wrong_size = [f"{k}: {tuple(adapter['lora'][k].shape)} vs {shape}"
                  for k, shape in _lora_shapes(model, targets, adapter["r"]).items()
                  if k in adapter["lora"] and tuple(adapter["lora"][k].shape) != shape]
    if wrong_size:
        raise LoraError(f"adapter {path!r} was trained on a base of another size: its shapes differ from this "
                        f"model's: {wrong_size[:3]}; pass the base it was trained on")
    if adapter["base_fingerprint"] is None and not force:
        raise LoraError(f"adapter {path!r} does not say which base it was trained on (written by another tool?)"
                        + (f"; pass {force_flag} if you know it fits this base" if force_flag else ""))
    if adapter["base_fingerprint"] != base_fingerprint and not force:
        raise BaseMismatch(f"adapter {path!r} was trained on base {adapter['base_fingerprint']}, but this base "
                           f"checkpoint is {base_fingerprint}; pass the base it was trained on"
                           + (f", or {force_flag}" if force_flag else ""), adapter["base_fingerprint"], path)
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLayer)) and not _inside_lora(n)]
    lacking = [t for t in targets if not any(n == t or n.split(".")[-1] == t for n in linear)]
    if lacking:
        raise LoraError(f"adapter {path!r} targets {lacking[:3]}, which this model lacks; its linear layers are "
                        f"named {sorted({n.split('.')[-1] for n in linear})}")
    dropout = adapter.get("dropout", adapter.get("config", {}).get("lora_dropout", 0.0))
    layers = add_lora(model, targets, adapter["r"], adapter["alpha"], dropout, adapter_name=name)
    expected = {f"{n}.{p}": getattr(layer, p) for n, layer in layers.items() for p in ("lora_a", "lora_b")}
    missing = sorted(set(expected) - set(adapter["lora"]))
    extra = sorted(set(adapter["lora"]) - set(expected))
    if missing or extra:
        raise LoraError(f"adapter {path!r} does not match targets {adapter['targets']} on this model: "
                        f"missing {missing[:3]}, unexpected {extra[:3]}")
    bad = [f"{k}: {tuple(adapter['lora'][k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if adapter["lora"][k].shape != v.shape]
    if bad:
        raise LoraError(f"adapter {path!r} shapes differ from this model (another base size?): {bad[:3]}")
    with torch.no_grad():
        for k, v in adapter["lora"].items():
            expected[k].copy_(v)
    for layer in layers.values():
        layer.adapter_weight = layer.scale = float(weight)
    return layers


# ---------------------------------------------------------------------- merging

class Merged(dict):
    """{name: LoraLayer} that merge_lora took out, plus the fused nn.Linear it put in each place."""

    def __init__(self, layers, fused):
        super().__init__(layers)
        self.fused = fused  # {name: (nn.Linear, weight version at merge time)}


@torch.no_grad()
def merge_lora(model, lora_scale=1.0):
    """Fold each LoRA update into its base weight and put a plain nn.Linear in the LoraLayer's place.

    W' = W + sum over stacked adapters of (lora_a lora_b)^T * alpha / r * scale, times
    ``lora_scale``, computed in fp32 (nn.Linear stores W as (out, in), hence the transpose). The
    merged model costs exactly what the base costs. Returns the LoraLayers for unmerge_lora; they
    keep the untouched base layer, which is what makes the unmerge exact."""
    merged = {n: m for n, m in lora_layers(model).items() if not _inside_lora(n)}
    if not merged:
        raise LoraError("merge_lora: the model has no LoRA layers to merge")
    fused_layers = {}
    for name, layer in merged.items():
        base = layer.base_layer
        weight = base.weight.float()
        stacked = layer
        while isinstance(stacked, LoraLayer):
            weight = weight + stacked.delta_weight() * lora_scale  # * 1.0 is exact
            stacked = stacked.net
        fused = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=base.weight.device, dtype=base.weight.dtype)
        fused.weight.copy_(weight.to(base.weight.dtype))
        if base.bias is not None:
            fused.bias.copy_(base.bias)
        fused.requires_grad_(False)
        _set_submodule(model, name, fused)
        fused_layers[name] = (fused, fused.weight._version)
    return Merged(merged, fused_layers)


def unmerge_lora(model, merged):
    """Put the LoraLayers back: the base weights are restored exactly (they were never modified).

    Refused, with nothing changed, where that would silently drop a change made after merging:
    a merged layer replaced (another adapter applied or merged on top) or its weight modified in place."""
    for name, (fused, version) in getattr(merged, "fused", {}).items():
        now = model.get_submodule(name)
        if now is not fused:
            raise LoraError(f"cannot unmerge {name}: it was replaced after merging ({type(now).__name__}), and "
                            "putting the old layer back would drop that change; unmerge in reverse order")
        if fused.weight._version != version:
            raise LoraError(f"cannot unmerge {name}: its merged weight was modified after merging (trained?); "
                            "restoring the base would lose that change")
    for name, layer in merged.items():
        _set_submodule(model, name, layer)


def _set_submodule(model, name, module):
    *parents, leaf = name.split(".")
    parent = model
    for p in parents:
        parent = getattr(parent, p)
    setattr(parent, leaf, module)
