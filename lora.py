"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") for the UNet's layers.

A frozen ``nn.Linear`` or ``nn.Conv2d`` gets trainable low-rank paths beside it, one per adapter:

    y = base(x) + sum over adapters of  s * B(A(dropout(x))),        s = alpha / r * weight

    Linear:  A = Linear(in, r), B = Linear(r, out)            A.weight (r, in), B.weight (out, r)
    Conv2d:  A = a k x k conv from in to r channels with the base's stride, padding and dilation,
             B = a 1x1 conv from r back to out channels       A.weight (r, in, k, k), B.weight (out, r, 1, 1)

These are PEFT's shapes, so an adapter file maps onto the layers without a transpose. B starts at
zero, so a new adapter is a no-op (as in loralib). Parameter names start with ``lora_``: that prefix
is the contract freezing and saving rely on. ``weight`` is the adapter's strength: 0 off, 1 as trained.

One LoraLayer wraps one base layer and holds its adapters side by side, by name (PEFT's design):
``lora_A[name]`` and ``lora_B[name]`` in ModuleDicts, their r, alpha, weight and on/off in dicts; the
layer lists, weights, enables, merges and removes them. With a single adapter named "default" the
parameters are ``M.lora_A.default.weight`` and ``M.lora_B.default.weight``.

    layers = add_lora(model, targets="attn", r=4, alpha=4)   # Wq, Wk, Wv; or "attn-all", "all", layer names
    mark_only_lora_as_trainable(model)
    set_lora_weight(model, 0.5, name="default")                # one adapter's strength (name=None: all)
    merged = merge_lora(model)                                 # plain layers again: zero inference overhead
    unmerge_lora(model, merged)                                # the exact base weights back

adapter.py reads and writes the files and applies them (apply_adapter) through these functions.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from config import R_MAX, valid_r
from errors import UserError

ADAPTABLE = (nn.Linear, nn.Conv2d)
ATTN = ("Wq", "Wk", "Wv")  # the tutorial's targets, and the default
# Target groups a user can name instead of layers. "attn-all" adds the attention output projection Wo and the
# feed-forward linears after the attention (unet.py: TransformerBlock.ff and CrossAttentionBlock.ff). "all" is
# every nn.Linear and nn.Conv2d of the UNet's blocks, as kohya's LoCon adapts every layer of SD's ResNet and
# transformer blocks, but not (ALL_EXCLUDED) the time-embedding MLP, conv_in and conv_out: the time MLP is shared
# by every block, so an update there moves how every layer reads the noise level rather than what digits look
# like, and conv_out writes the predicted noise itself, where a low-rank error reaches the sample with no later
# layer to correct it (conv_in, its mirror, is left out with it, as kohya and PEFT's "all-linear" leave out the
# model's ends). Name them explicitly (--targets all,time_mlp.0,conv_out) to adapt them anyway.
GROUPS = ("attn", "attn-all", "all")
ALL_EXCLUDED = ("time_mlp", "conv_in", "conv_out")


class LoraError(UserError):
    """An adapter that does not fit the model, or targets that match nothing: the message says what differs."""


class BaseMismatch(LoraError):
    """An adapter trained on other base weights than the ones given; ``trained_on`` is its base's fingerprint."""

    def __init__(self, message, trained_on, path):
        super().__init__(message)
        self.trained_on, self.path = trained_on, path


def _init_a(shape):
    """A's initial values: Kaiming-uniform with fan_in = in (x k x k), as nn.Linear, nn.Conv2d and loralib do.

    Drawn on the CPU into an (in, r) tensor through its transpose for a Linear, as this project always drew
    them, so a seed gives the same adapter as before (and on every device)."""
    if len(shape) == 2:
        a = torch.empty(shape[1], shape[0])
        nn.init.kaiming_uniform_(a.T, a=math.sqrt(5))
        return a.T
    a = torch.empty(shape)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


def require_r(r):
    """``r`` when it is a LoRA rank (config.valid_r), else a LoraError."""
    if valid_r(r) is None:
        raise LoraError(f"LoRA rank r must be a whole number from 1 to {R_MAX}, got {r!r}")
    return r


class LoraLayer(nn.Module):
    """One base layer (nn.Linear or nn.Conv2d, frozen) and any number of LoRA adapters beside it, by name."""

    def __init__(self, base_layer):
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE):
            raise LoraError(f"LoRA adapts nn.Linear and nn.Conv2d layers, not {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Conv2d) and (base_layer.groups != 1 or base_layer.padding_mode != "zeros"):
            raise LoraError("LoRA on a grouped or non-zero-padded Conv2d is not supported")
        # the adapters' modules are registered before the base layer, so the trainable parameters come first in
        # this layer, in the order a fine-tune's saved optimizer state lists them
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.base_layer = base_layer
        self.r, self.alpha, self.weights, self.enabled = {}, {}, {}, {}  # by adapter name; weights: strengths

    # ------------------------------------------------------------ the adapters

    @property
    def adapter_names(self):
        return list(self.lora_A)

    def add_adapter(self, name, r, alpha, dropout=0.0):
        """A new adapter ``name``: A random, B zero (a no-op until trained or loaded), weight 1."""
        require_r(r)
        if not isinstance(name, str) or not name or "." in name:
            raise LoraError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.lora_A:
            raise LoraError(f"this layer already holds an adapter named {name!r}; pick another name")
        base = self.base_layer
        if isinstance(base, nn.Linear):
            a = nn.utils.skip_init(nn.Linear, base.in_features, r, bias=False)
            b = nn.utils.skip_init(nn.Linear, r, base.out_features, bias=False)
        else:
            a = nn.utils.skip_init(nn.Conv2d, base.in_channels, r, base.kernel_size, stride=base.stride,
                                   padding=base.padding, dilation=base.dilation, bias=False)
            b = nn.utils.skip_init(nn.Conv2d, r, base.out_channels, 1, bias=False)
        with torch.no_grad():
            a.weight.copy_(_init_a(a.weight.shape))
            b.weight.zero_()  # zero: the adapter starts as a no-op
        device = base.weight.device
        self.lora_A[name], self.lora_B[name] = a.to(device), b.to(device)  # fp32 whatever the base's dtype
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.alpha[name], self.weights[name], self.enabled[name] = r, float(alpha), 1.0, True

    def delete_adapter(self, name):
        self._check(name)
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        for d in (self.r, self.alpha, self.weights, self.enabled):
            del d[name]

    def set_weight(self, name, weight):
        self._check(name)
        self.weights[name] = float(weight)

    def enable(self, name, enabled=True):
        self._check(name)
        self.enabled[name] = bool(enabled)

    def _check(self, name):
        if name not in self.lora_A:
            raise LoraError(f"no adapter named {name!r} here; this layer holds {self.adapter_names}")

    def scaling(self, name):
        """s = alpha / r * weight: what multiplies B A."""
        return self.alpha[name] / self.r[name] * self.weights[name]

    def active(self):
        """The adapters that change the output: enabled, at a non-zero weight (0 is the base exactly)."""
        return [n for n in self.lora_A if self.enabled[n] and self.weights[n] != 0]

    # ------------------------------------------------------------ the update

    def delta_weight(self, name):
        """One adapter's update in the base weight's layout, in fp32: s * B A (for a conv, B's 1x1 times A's k x k)."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = b.flatten(1) @ a.flatten(1)  # (out, r) @ (r, in * k * k)
        return delta.view(self.base_layer.weight.shape) * self.scaling(name)

    def _base_call(self, x, weight):
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return nn.functional.linear(x, weight, base.bias)
        return base._conv_forward(x, weight, base.bias)

    def forward(self, x):
        active = self.active()
        if not active:
            return self.base_layer(x)
        frozen = not (torch.is_grad_enabled() and any(
            p.requires_grad for n in active for p in (self.lora_A[n].weight, self.lora_B[n].weight)))
        no_dropout = not self.training or all(isinstance(self.lora_dropout[n], nn.Identity) for n in active)
        if frozen and no_dropout:
            # Not training the adapters: fold them into the weight for this call, W + sum s B A, one small addmm
            # of the weight's size each, then the base's own linear or conv. The low-rank path below costs two
            # skinny products over every token or pixel (N x in x r), which on a CPU took longer than the linear
            # itself; for a conv the fold is one (out x r x in k k) product against a conv over every pixel.
            w = self.base_layer.weight
            shape = w.shape
            w = w.flatten(1)
            for n in active:
                b, a = self.lora_B[n].weight.flatten(1), self.lora_A[n].weight.flatten(1)
                if isinstance(self.base_layer, nn.Linear):
                    # the operands in the memory layout this fold always had (the transposes of contiguous
                    # (r, out) and (in, r) tensors), so an adapter samples the very same digits as before
                    b, a = b.T.contiguous().T, a.T.contiguous().T
                w = torch.addmm(w, b, a, alpha=self.scaling(n))
            return self._base_call(x, w.view(shape))
        out = self.base_layer(x)
        for n in active:
            drop = self.lora_dropout[n]
            h = x if isinstance(drop, nn.Identity) else drop(x)
            s = self.scaling(n)
            if isinstance(self.base_layer, nn.Linear):
                # out + s (x A^T) B^T with the scale and the sum in one addmm: two kernels instead of four
                # (matmul, matmul, mul, add); the gradients of A and B stay low-rank products. A^T and B^T are
                # made contiguous, (in, r) and (r, out) as this layer always multiplied them: a transposed
                # operand takes another BLAS path whose last bits differ, and a seed must keep giving the same
                # adapter (the copies are r x in and out x r, nothing beside the products)
                xa = h.reshape(-1, h.shape[-1]) @ self.lora_A[n].weight.T.contiguous()  # (N, r)
                out = torch.addmm(out.reshape(-1, out.shape[-1]), xa, self.lora_B[n].weight.T.contiguous(),
                                  alpha=s).view(out.shape)
            else:
                out = out + self.lora_B[n](self.lora_A[n](h)) * s
        return out

    def extra_repr(self):
        return ", ".join(f"{n}: r={self.r[n]}, alpha={self.alpha[n]:g}, weight={self.weights[n]:g}"
                         + ("" if self.enabled[n] else " (off)") for n in self.lora_A)


class GuidanceEmbedding(nn.Module):
    """A speed adapter's guidance input (distill.py): per adapter, a ``dim`` x ``dim`` Linear from the embedding of
    the guidance scale w to the step's embedding (LCM's ``time_cond_proj``), zero at first so a new one is a no-op,
    held by name and weighted as a LoraLayer's adapters are. The UNet holds it as ``w_embed``; the ``lora_`` prefix
    of ``lora_w`` makes it trainable and saved with the adapter (PEFT: ``modules_to_save``)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.lora_w = nn.ModuleDict()
        self.weights = {}

    def add_adapter(self, name, weight=1.0):
        if name in self.lora_w:
            raise LoraError(f"the guidance input already holds an adapter named {name!r}; pick another name")
        lin = nn.Linear(self.dim, self.dim, bias=False)
        nn.init.zeros_(lin.weight)
        self.lora_w[name], self.weights[name] = lin, float(weight)
        return lin

    def forward(self, e):  # (B, dim) embedding of w -> (B, dim), added to the step's embedding
        out = torch.zeros_like(e)
        for n, lin in self.lora_w.items():
            if self.weights[n] != 0:
                out = out + self.weights[n] * lin(e)
        return out


def add_guidance_input(model, name="default", weight=1.0):
    """Give ``model`` (a UNet) adapter ``name``'s guidance input, a zero Linear, creating ``model.w_embed`` first."""
    if model.w_embed is None:
        model.w_embed = GuidanceEmbedding(model.cfg.time_dim).to(model.time_mlp[0].weight.device)
    return model.w_embed.add_adapter(name, weight)


# ------------------------------------------------------------ targets

def _adaptable(model):
    """(name, layer) of every nn.Linear and nn.Conv2d in ``model``, LoraLayers counted as their base layer."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            out.append((n, m))
        elif isinstance(m, ADAPTABLE) and not (n.endswith(".base_layer") or ".base_layer." in n
                                               or ".lora_A." in n or ".lora_B." in n):
            out.append((n, m))
    return out


def _in_group(name, group):
    leaf = name.split(".")[-1]
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    if group == "attn":
        return leaf in ATTN
    if group == "attn-all":
        return leaf in ATTN + ("Wo",) or parent == "ff" or parent.endswith(".ff")
    return name.split(".")[0] not in ALL_EXCLUDED  # "all"


def resolve_targets(model, targets):
    """The dotted names of the layers ``targets`` picks, in the model's order.

    ``targets`` is a group name ("attn", "attn-all", "all"; see GROUPS), a layer's name (its last part, as
    "Wq", or its whole dotted name) or a list of these; a comma-separated string is read as a list."""
    if isinstance(targets, str):
        targets = targets.split(",")
    targets = [str(t).strip() for t in targets]
    if not targets or not all(targets):
        raise LoraError(f"LoRA targets {targets} are empty; name layers or a group ({', '.join(GROUPS)})")
    layers = _adaptable(model)
    names = [n for n, _ in layers
             if any(_in_group(n, t) if t in GROUPS else (n == t or n.split(".")[-1] == t) for t in targets)]
    unmatched = [t for t in targets if t not in GROUPS and not any(n == t or n.split(".")[-1] == t for n, _ in layers)]
    if not names or unmatched:
        leaves = sorted({n.split(".")[-1] for n, _ in layers})
        raise LoraError(f"LoRA targets {unmatched or targets} match no nn.Linear or nn.Conv2d in the model; its "
                        f"layer names are {leaves}, and the groups {', '.join(GROUPS)}")
    return names


def short_targets(names):
    """Module names shortened to their last part (two where the last is an index, as ff.0), each once: for messages."""
    return list(dict.fromkeys(".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                              for n in names))


# ------------------------------------------------------------ adding, listing, weighting

def add_lora(model, targets=ATTN, r=4, alpha=4.0, dropout=0.0, adapter_name="default"):
    """Add adapter ``adapter_name`` to every layer ``targets`` picks (resolve_targets); returns {name: LoraLayer}.

    A layer without adapters is wrapped in a LoraLayer; one that has some gets this one beside them.
    Names are collected first and replaced afterwards: editing a module while iterating over
    named_modules() skips or revisits layers (the tutorial's loop did)."""
    require_r(r)  # before any layer is wrapped: a bad r changes nothing
    names = resolve_targets(model, targets)
    taken = [n for n in names if isinstance(model.get_submodule(n), LoraLayer)
             and adapter_name in model.get_submodule(n).lora_A]
    if taken:
        raise LoraError(f"layer {taken[0]} already holds an adapter named {adapter_name!r}; pick another name")
    layers = {}
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, LoraLayer):
            m = LoraLayer(m)
            _set_submodule(model, n, m)
        m.add_adapter(adapter_name, r, alpha, dropout)
        layers[n] = m
    return layers


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(model):
    """Every adapter's name in the model, each once (in the order of the first layer holding it)."""
    return list(dict.fromkeys(a for layer in lora_layers(model).values() for a in layer.adapter_names))


def _layers_with(model, name):
    layers = [layer for layer in lora_layers(model).values() if name is None or name in layer.lora_A]
    if name is not None and not layers:
        raise LoraError(f"the model holds no adapter named {name!r}; it holds {adapter_names(model)}")
    return layers


def set_lora_weight(model, weight, name=None):
    """The strength of adapter ``name`` (None: of every adapter): 0 off, 1 as trained, negative reverses it."""
    weight = float(weight)
    if not math.isfinite(weight):
        raise LoraError(f"an adapter's weight must be a finite number, got {weight}")
    for layer in _layers_with(model, name):
        for n in ([name] if name is not None else layer.adapter_names):
            layer.set_weight(n, weight)
    guidance = getattr(model, "w_embed", None)
    if isinstance(guidance, GuidanceEmbedding):  # a speed adapter's guidance input follows its weight
        for n in guidance.weights:
            if name is None or n == name:
                guidance.weights[n] = weight


def enable_lora(model, enabled=True, name=None):
    """Turn adapter ``name`` (None: every adapter) off or on again, keeping its weight."""
    for layer in _layers_with(model, name):
        for n in ([name] if name is not None else layer.adapter_names):
            layer.enable(n, enabled)


def remove_lora(model, name=None):
    """Delete adapter ``name`` (None: all); a layer left without adapters becomes its plain base layer again."""
    _layers_with(model, name)
    for path, layer in list(lora_layers(model).items()):
        for n in layer.adapter_names if name is None else [name] if name in layer.lora_A else []:
            layer.delete_adapter(n)
        if not layer.lora_A:
            _set_submodule(model, path, layer.base_layer)
    guidance = getattr(model, "w_embed", None)
    if isinstance(guidance, GuidanceEmbedding):
        for n in [n for n in guidance.weights if name is None or n == name]:
            del guidance.lora_w[n], guidance.weights[n]
        if not guidance.weights:
            model.w_embed = None  # the base's own forward again


def mark_only_lora_as_trainable(model):
    """Freeze every parameter whose name lacks ``lora_``; returns (trainable, total) parameter counts."""
    trainable = total = 0
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def lora_state_dict(model, name="default"):
    """Adapter ``name``'s tensors, {M.lora_A: A, M.lora_B: B} in PEFT's shapes: detached fp32 copies on the CPU."""
    _layers_with(model, name)  # names the adapters there are when ``name`` is not one of them
    out = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            out[f"{path}.lora_A"] = layer.lora_A[name].weight.detach().float().cpu().clone()
            out[f"{path}.lora_B"] = layer.lora_B[name].weight.detach().float().cpu().clone()
    return out


# ---------------------------------------------------------------------- merging

class Merged(dict):
    """{name: LoraLayer} that merge_lora took out, plus the fused base layer it put in each place."""

    def __init__(self, layers, fused):
        super().__init__(layers)
        self.fused = fused  # {name: (fused layer, weight version at merge time)}


@torch.no_grad()
def merge_lora(model):
    """Fold every layer's adapters into its base weight and put a plain layer (Linear or Conv2d) in its place.

    W' = W + sum over the layer's active adapters of s B A, computed in fp32. The merged model
    costs exactly what the base costs. Returns the LoraLayers for unmerge_lora; they keep the
    untouched base layer, which is what makes the unmerge exact."""
    merged = lora_layers(model)
    if not merged:
        raise LoraError("merge_lora: the model has no LoRA layers to merge")
    fused_layers = {}
    for name, layer in merged.items():
        base = layer.base_layer
        weight = base.weight.float()
        for n in layer.active():
            weight = weight + layer.delta_weight(n)
        fused = copy.deepcopy(base)
        fused.weight.copy_(weight.to(base.weight.dtype))
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
