"""An adapter in memory and on a model: the ``Adapter`` and ``TrainingState`` objects, and attaching adapters.

    ad = Adapter.new(lcfg, fingerprint, base_path="out/ckpt.pt")   # settings from a LoraConfig, no tensors yet
    add_adapter_layers(model, ad)                                # its layers, to train
    ad = adapter_from_model(model, ad)                           # the trained tensors, ready to write
    attach_adapters(model, adapters, fingerprint)                # several side by side, each at its weight

In memory an adapter is an ``Adapter``: ``tensors`` maps ``M.lora_A`` and ``M.lora_B`` to fp32 tensors in
PEFT's shapes, beside ``r``, ``alpha`` (the update is scaled by alpha / r), ``targets`` and the rest below.
The training state a fine-tune resumes from is its own object, ``TrainingState``. Reading and writing the
files (PEFT's folder, kohya's file, the old .pt) is adapter_formats.py's; a base with its adapters, ready to
sample, is pipeline.py's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import KW_ONLY, dataclass, field

import torch
import torch.nn as nn

from config import DEFAULT_OUT_DIR
from lora import (BaseMismatch, LoraError, LoraLayer, add_guidance_input, add_lora, lora_state_dict, resolve_targets,
                  set_lora_weight)

KOHYA_PREFIX = "lora_unet_"  # kohya's module names: this, then the module's dotted path with underscores
# What an adapter may carry beside its LoRA pairs, saved whole (PEFT's modules_to_save): a speed adapter's guidance
# input (lora.GuidanceEmbedding), "w_embed.weight" in the file, (time_dim, time_dim)
SAVED_MODULES = ("w_embed",)
KINDS = ("lcm",)  # an adapter's kind beside a style's: lcm, a speed adapter (distill.py)


# ----------------------------------------------------------------- the objects

@dataclass
class Adapter:
    """One LoRA adapter: its tensors and everything needed to apply it, as read from or written to a file."""
    tensors: dict  # {"M.lora_A": A, "M.lora_B": B}, fp32 in PEFT's shapes, for every adapted module M
    r: int
    alpha: float  # the update is B A * alpha / r
    _: KW_ONLY
    targets: list | None = None  # target_modules: the adapted modules' names (older files: layer names, "Wq")
    style: str | None = None  # none | italic | bold | font:NAME | data:NAME, what it was trained on
    base_fingerprint: str | None = None  # state_fingerprint of the base weights it was trained on
    base_path: str | None = None  # the base checkpoint's path as the fine-tune was given it
    base_name: str | None = None  # the base checkpoint's file name, for a message when the path is elsewhere
    dropout: float = 0.0
    path: str | None = None  # the file or folder it was read from
    format: str = "peft"  # peft | kohya | legacy-pt: the layout it was read from
    notes: list = field(default_factory=list)  # what was assumed on loading
    weight: float = 1.0  # its strength when applied (PATH:WEIGHT)
    name: str | None = None  # its name in a model, once attached
    kind: str | None = None  # None: a style; "lcm": a speed adapter, sampled with --sampler lcm (KINDS)
    saved_modules: dict = field(default_factory=dict)  # {"w_embed.weight": tensor}: SAVED_MODULES, fp32

    @classmethod
    def new(cls, lcfg, base_fingerprint=None, base_path=None):
        """The settings of an adapter to train, from a LoraConfig; tensors come with adapter_from_model."""
        return cls({}, lcfg.r, lcfg.alpha, targets=list(lcfg.targets), style=lcfg.style,
                   base_fingerprint=base_fingerprint, base_path=base_path,
                   base_name=os.path.basename(base_path) if base_path else None, dropout=lcfg.lora_dropout)

    @property
    def modules(self):
        """The module paths the tensors belong to, sorted."""
        return sorted({k.rsplit(".", 1)[0] for k in self.tensors})

    def pair(self, module):
        return self.tensors[f"{module}.lora_A"], self.tensors[f"{module}.lora_B"]

    def delta_weights(self):
        """{module: fp32 update at weight 1, in the base weight's layout}: B A alpha / r (B 1x1 by A k x k: a conv)."""
        out = {}
        for m in self.modules:
            a, b = self.pair(m)
            d = b.float().flatten(1) @ a.float().flatten(1) * (self.alpha / self.r)
            out[m] = d.view(b.shape[0], *a.shape[1:])
        return out

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class TrainingState:
    """What lora_finetune.py --resume needs beside the adapter; never part of the shared files."""
    tensors: dict  # the adapter's tensors this optimizer state belongs to (Adapter.tensors' layout)
    optimizer: dict
    rng: dict
    step: int
    _: KW_ONLY
    epoch: int = 0
    config: dict = field(default_factory=dict)  # LoraConfig, as saved
    train_config: dict = field(default_factory=dict)  # TrainConfig, as saved
    base_config: dict | None = None
    data_size: int | None = None


def content_hash(tensors):
    """sha256 of names, dtypes, shapes and bytes, in name order: changes if any stored bit does."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_from_model(model, adapter, name="default"):
    """``adapter`` with the tensors of adapter ``name`` in ``model`` (what lora_finetune.py trained), and its
    guidance input's where it has one (a speed adapter)."""
    saved, guidance = {}, getattr(model, "w_embed", None)
    if guidance is not None and name in guidance.lora_w:
        saved["w_embed.weight"] = guidance.lora_w[name].weight.detach().float().cpu().clone()
    return adapter.replace(tensors=lora_state_dict(model, name), saved_modules=saved)


def add_adapter_layers(model, adapter, name="default"):
    """New layers for ``adapter``'s settings (A random, B zero), on the modules its targets pick; records them.

    Its ``targets`` become the resolved module names, which is what the file records (target_modules)."""
    layers = add_lora(model, adapter.targets, adapter.r, adapter.alpha, adapter.dropout, adapter_name=name)
    adapter.targets = list(layers)
    return layers


# ------------------------------------------------- applying, names, several adapters

def kohya_name(module):
    return KOHYA_PREFIX + module.replace(".", "_")


def resolve_kohya_names(adapter, model):
    """Map kohya's flattened names (dots became underscores) back through the model's own module names.

    Two of the model's modules that flatten to the same name make the mapping ambiguous: refused."""
    if adapter.format != "kohya" or adapter.targets is not None:
        return adapter
    flat = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, LoraLayer)) and ".base_layer" not in n and ".lora_" not in n:
            flat.setdefault(kohya_name(n), []).append(n)
    tensors, unknown = {}, []
    for m in adapter.modules:
        names = flat.get(m)
        if not names:
            unknown.append(m)
            continue
        if len(names) > 1:
            raise LoraError(f"{adapter.path!r}: kohya name {m} is ambiguous on this model: it could be "
                            f"{' or '.join(names)}")
        for part in ("lora_A", "lora_B"):
            tensors[f"{names[0]}.{part}"] = adapter.tensors[f"{m}.{part}"]
    if unknown:
        what = "none" if len(unknown) == len(adapter.modules) else f"{len(unknown)}"
        raise LoraError(f"{adapter.path!r}: {what} of its {len(adapter.modules)} modules match this model's "
                        f"layers, e.g. {unknown[:2]}; it was made for another model")
    out = adapter.replace(tensors=tensors)
    out.targets = out.modules
    return out


def _expected_shapes(layer, r):
    base = layer.base_layer if isinstance(layer, LoraLayer) else layer
    if isinstance(base, nn.Linear):
        return (r, base.in_features), (base.out_features, r)
    return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)


def _base_hint(adapter):
    """Where the base an adapter names can be found, when its file is at hand."""
    for path in (adapter.base_path, adapter.base_name and os.path.join(DEFAULT_OUT_DIR, adapter.base_name)):
        if path and os.path.isfile(path):
            return f" ({path}, which is here: pass --ckpt {path})"
    return f" (recorded as {adapter.base_path})" if adapter.base_path else ""


def apply_adapter(model, adapter, base_fingerprint, force=False, name="default", weight=1.0, force_flag="--force"):
    """Add ``adapter``'s layers to ``model`` as adapter ``name`` at ``weight`` and load its tensors, checking
    base, modules and shapes.

    ``force`` overrides only the base-fingerprint check (an adapter trained on another base
    usually still loads, but its effect is unpredictable); modules and shapes are always checked.
    On a model that already has adapters this one goes beside them. ``force_flag`` is the caller's
    flag that sets ``force``, named in the messages (None: it has none)."""
    path = adapter.path or "adapter"
    modules = adapter.modules
    layers = dict(model.named_modules())
    absent = [m for m in modules if m not in layers]
    # sizes first: an adapter for a base of another size is that, whatever its fingerprint says
    wrong_size = []
    for m in modules:
        if m in layers and isinstance(layers[m], (nn.Linear, nn.Conv2d, LoraLayer)):
            want = _expected_shapes(layers[m], adapter.r)
            got = tuple(tuple(t.shape) for t in adapter.pair(m))
            if got != want:
                wrong_size.append(f"{m}: {got} vs {want}")
    if wrong_size:
        raise LoraError(f"adapter {path!r} was trained on a base of another size: its shapes differ from this "
                        f"model's: {wrong_size[:3]}; pass the base it was trained on")
    if adapter.base_fingerprint is None and not force:
        raise LoraError(f"adapter {path!r} does not say which base it was trained on (written by another tool?)"
                        + (f"; pass {force_flag} if you know it fits this base" if force_flag else ""))
    if adapter.base_fingerprint != base_fingerprint and not force:
        raise BaseMismatch(f"adapter {path!r} was trained on base {adapter.base_fingerprint}{_base_hint(adapter)}, "
                           f"but this base checkpoint is {base_fingerprint}; pass the base it was trained on"
                           + (f", or {force_flag}" if force_flag else ""), adapter.base_fingerprint, path)
    targets = adapter.targets or modules
    try:
        picked = resolve_targets(model, targets)
    except LoraError:
        adaptable = [n for n, m in layers.items() if isinstance(m, (nn.Linear, nn.Conv2d, LoraLayer))]
        lacking = [t for t in targets if t not in ("attn", "attn-all", "all")
                   and not any(n == t or n.split(".")[-1] == t for n in adaptable)]
        raise LoraError(f"adapter {path!r} targets {lacking[:3]}, which this model lacks; its layers are "
                        f"named {sorted({n.split('.')[-1] for n in adaptable})}") from None
    missing, extra = sorted(set(picked) - set(modules)), sorted(set(modules) - set(picked))
    if missing or extra or absent:
        raise LoraError(f"adapter {path!r} does not match targets {adapter.targets} on this model: "
                        f"missing {missing[:3]}, unexpected {(extra or absent)[:3]}")
    w_embed = adapter.saved_modules.get("w_embed.weight")
    if w_embed is not None and tuple(w_embed.shape) != (model.cfg.time_dim,) * 2:
        raise LoraError(f"adapter {path!r} was trained on a base of another size: its guidance input is "
                        f"{tuple(w_embed.shape)}, this model's time embedding {model.cfg.time_dim} wide; pass the "
                        "base it was trained on")
    new = add_lora(model, picked, adapter.r, adapter.alpha, adapter.dropout, adapter_name=name)
    if w_embed is not None:
        with torch.no_grad():
            add_guidance_input(model, name, weight).weight.copy_(w_embed)
    with torch.no_grad():
        for m, layer in new.items():
            a, b = adapter.pair(m)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
            layer.set_weight(name, weight)
    return new


def check_same_base(adapters):
    """Adapters trained on different bases cannot be meant for one model: refuse naming both."""
    known = [(a.path, a.base_fingerprint) for a in adapters if a.base_fingerprint]
    for path, fp in known[1:]:
        if fp != known[0][1]:
            raise LoraError(f"adapters {known[0][0]!r} and {path!r} were trained on different bases "
                            f"({known[0][1]} vs {fp}); use adapters of one base (or --force)")


def adapter_name(path, taken=()):
    """The name an adapter at ``path`` is held by in a model: its folder's name, a dot made "_" (a module name
    holds none), and "+" added until it is none of ``taken``. denoise.py's --lora and the page both use it."""
    name = os.path.basename(os.path.normpath(str(path or "adapter"))).replace(".", "_") or "adapter"
    while name in taken:
        name += "+"
    return name


def attach_adapters(model, adapters, base_fingerprint, force=False):
    """Apply several adapters side by side, each at its own weight (``adapter.weight``), to one model.

    Each is checked against the base fingerprint; names are made unique from the paths and recorded in
    ``adapter.name``. Returns the names."""
    if not force:
        check_same_base(adapters)
    names = []
    for ad in adapters:
        name = adapter_name(ad.path, names)
        names.append(name)
        apply_adapter(model, resolve_kohya_names(ad, model), base_fingerprint, force=force, name=name,
                      weight=ad.weight)
        ad.name = name
    return names


def set_weights(model, adapters, factor=1.0):
    """Every attached adapter at ``factor`` times its own weight (PATH:WEIGHT): 0 is the base, 1 as asked."""
    for ad in adapters:
        set_lora_weight(model, factor * ad.weight, ad.name)
