"""Adapter files: the folder people share (PEFT's layout), kohya's single file, the old .pt, and training state.

    out/lora/adapter_model.safetensors   per adapted module M: base_model.model.M.lora_A.weight (r, in) and
                                         ...lora_B.weight (out, r), PEFT's names and shapes; the header's
                                         __metadata__ holds what only we know: the base fingerprint, the
                                         style, this format's version and a hash of the tensor data
    out/lora/adapter_config.json         PEFT's LoraConfig: peft_type LORA, r, lora_alpha, target_modules, ...
    out/lora/training_state.pt           for lora_finetune.py --resume only: optimizer, RNG, step, configs;
                                         never needed to use or share the adapter

    save_adapter("out/lora", model, r, alpha, targets, fingerprint, style="italic", training_state={...})
    ad = load_adapter("out/lora")        # a folder, a kohya .safetensors or an old .pt; else one LoraError
    attach_adapters(model, load_adapters(["out/lora:0.8", "bold:0.5"]), fingerprint)

In memory an adapter is a plain dict in our own layout: ``lora`` maps ``M.lora_a`` (in, r) and
``M.lora_b`` (r, out) to fp32 tensors (the transposes of PEFT's lora_A and lora_B), beside ``r``,
``alpha`` (the update is scaled by alpha / r), ``targets``, ``modules``, ``base_fingerprint``
(None when the file does not say), ``style``, ``format`` and ``notes`` (what was assumed on loading).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile

import torch

from checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from files import atomic_write
from errors import CLIError
from lora import LoraError, LoraLayer, apply_adapter, lora_state_dict

ADAPTER_FORMAT_VERSION = 2  # 1 was the single torch .pt file
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
STATE_NAME = "training_state.pt"
DEFAULT_ADAPTER = os.path.join("out", "lora")
LEGACY_DEFAULT_ADAPTER = os.path.join("out", "lora.pt")
META = "mnist_sd."  # prefix of our own header fields, apart from PEFT's and kohya's
PEFT_PREFIX = "base_model.model."
KOHYA_PREFIX = "lora_unet_"


# ----------------------------------------------------------------- the tensors

def content_hash(tensors):
    """sha256 of names, dtypes, shapes and bytes, in name order: changes if any stored bit does."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def modules_of(lora):
    """The module paths an adapter's tensors belong to, sorted."""
    return sorted({k.rsplit(".", 1)[0] for k in lora})


def adapter_from_model(model, r, alpha, targets, base_fingerprint, style=None, dropout=0.0):
    """The in-memory adapter of a model with one LoRA adapter attached (what lora_finetune.py trained)."""
    lora = {k: v.float() for k, v in lora_state_dict(model).items()}
    return make_adapter(lora, r, alpha, targets, base_fingerprint, style, dropout=dropout)


def make_adapter(lora, r, alpha, targets=None, base_fingerprint=None, style=None, fmt="peft", dropout=0.0,
                 notes=(), path=None):
    targets = list(targets) if targets else sorted({m.rsplit(".", 1)[-1] for m in modules_of(lora)})
    return {"format": fmt, "lora": lora, "r": int(r), "alpha": float(alpha), "targets": targets,
            "modules": modules_of(lora), "base_fingerprint": base_fingerprint, "style": style,
            "dropout": float(dropout), "notes": list(notes), "path": path}


def delta_weights(adapter):
    """{module: (out, in) fp32 update} as the adapter applies it at weight 1: (A B)^T alpha / r."""
    lora, s = adapter["lora"], adapter["alpha"] / adapter["r"]
    return {m: (lora[f"{m}.lora_a"] @ lora[f"{m}.lora_b"]).T * s for m in adapter["modules"]}


def adapter_size(path):
    """Bytes a user shares: the safetensors file and its config (the training state stays home)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in (WEIGHTS_NAME, CONFIG_NAME)
                   if os.path.exists(os.path.join(path, n)))
    return os.path.getsize(path)


# --------------------------------------------------------------------- writing

def peft_config(adapter):
    """adapter_config.json as PEFT's LoraConfig writes it (the fields it needs to rebuild the layers)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": adapter["r"],
            "lora_alpha": adapter["alpha"], "target_modules": list(adapter["targets"]),
            "lora_dropout": adapter["dropout"], "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {}, "inference_mode": True}


def _metadata(adapter, tensors, **extra):
    meta = {"format": "pt", f"{META}format_version": str(ADAPTER_FORMAT_VERSION),
            f"{META}content_sha256": content_hash(tensors), f"{META}r": str(adapter["r"]),
            f"{META}lora_alpha": repr(adapter["alpha"]), f"{META}target_modules": json.dumps(adapter["targets"])}
    if adapter.get("base_fingerprint"):
        meta[f"{META}base_fingerprint"] = adapter["base_fingerprint"]
    if adapter.get("style"):
        meta[f"{META}style"] = adapter["style"]
    meta.update(extra)
    return meta


def save_adapter(path, model, r, alpha, targets, base_fingerprint, style=None, dropout=0.0, training_state=None):
    """Write the adapter folder (PEFT's layout) for a model with one adapter attached; see write_adapter."""
    write_adapter(path, adapter_from_model(model, r, alpha, targets, base_fingerprint, style, dropout),
                  training_state)


def check_output_folder(path):
    """An adapter is a folder now: refuse a path that is a file (an old lora.pt) before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{path!r} is a file, but an adapter is written as a folder (PEFT's layout); choose "
                       "another path, e.g. out/lora (an old .pt converts with: python lora_tools.py convert "
                       f"{path} out/lora)")


def write_adapter(folder, adapter, training_state=None):
    """Write adapter_model.safetensors + adapter_config.json (+ training_state.pt) into ``folder``.

    Everything is written into a fresh temporary folder beside ``folder`` first. A new ``folder``
    is then one os.rename: all or nothing. An existing one (every epoch of a fine-tune rewrites
    it) is updated file by file with os.replace, the training state first and the config last:
    each file is always whole, and a crash between two replaces can only pair files from two
    consecutive saves of the same run (same r, alpha and targets). The header repeats r and alpha,
    so load_adapter names any other mix instead of using it, and the training state
    carries its own copy of the tensors, so --resume never depends on the shared file."""
    check_output_folder(folder)
    lora = adapter["lora"]
    tensors = {}
    for m in adapter["modules"]:
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = lora[f"{m}.lora_a"].detach().float().cpu().T.contiguous()
        tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = lora[f"{m}.lora_b"].detach().float().cpu().T.contiguous()
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(folder)) + ".")
    try:
        meta = _metadata(adapter, tensors)
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=meta)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(peft_config(adapter), f, indent=2)
            f.write("\n")
        names = [WEIGHTS_NAME, CONFIG_NAME]
        if training_state is not None:
            save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "lora_state",
                             "adapter_sha256": meta[f"{META}content_sha256"],
                             "lora": {k: v.detach().cpu().clone() for k, v in lora.items()}, **training_state},
                            os.path.join(tmp, STATE_NAME))
            names.insert(0, STATE_NAME)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private, and safetensors its file:
        for name in names:  # give the usual permissions, so the folder can be shared as it is
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if not os.path.exists(folder):
            os.rename(tmp, folder)
            return folder
        if training_state is None and os.path.exists(os.path.join(folder, STATE_NAME)):
            os.remove(os.path.join(folder, STATE_NAME))  # it belonged to the adapter being replaced
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        return folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def kohya_name(module):
    return KOHYA_PREFIX + module.replace(".", "_")


def write_kohya(path, adapter):
    """One .safetensors file in kohya sd-scripts' layout: lora_down (r, in), lora_up (out, r), a 0-dim alpha."""
    tensors = {}
    for m in adapter["modules"]:
        k = kohya_name(m)
        tensors[f"{k}.lora_down.weight"] = adapter["lora"][f"{m}.lora_a"].float().cpu().T.contiguous()
        tensors[f"{k}.lora_up.weight"] = adapter["lora"][f"{m}.lora_b"].float().cpu().T.contiguous()
        tensors[f"{k}.alpha"] = torch.tensor(float(adapter["alpha"]))
    meta = _metadata(adapter, tensors, ss_network_module="networks.lora", ss_network_dim=str(adapter["r"]),
                     ss_network_alpha=repr(adapter["alpha"]), ss_base_model_version="mnist_sd_unet",
                     ss_training_comment=f"style {adapter.get('style') or 'unknown'}")
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


# --------------------------------------------------------------------- reading

def load_adapter(path, map_location="cpu"):
    """Read any adapter we know: a PEFT folder (or its .safetensors), a kohya .safetensors, an old .pt.

    Every problem (missing, truncated, corrupt, another tool's layout we cannot use) is one
    LoraError naming the file; nothing is assumed silently (see the adapter's ``notes``)."""
    path = str(path)
    if not os.path.exists(path):
        raise LoraError(f"LoRA adapter {path!r} not found; fine-tune one first: python lora_finetune.py")
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.exists(weights):
            raise LoraError(f"LoRA adapter folder {path!r} has no {WEIGHTS_NAME}; it is not an adapter "
                            "(or an interrupted copy): re-create it")
        ad = _load_safetensors(weights, path)
    elif path.endswith(".safetensors"):
        ad = _load_safetensors(path, path)
    else:
        ad = _load_legacy(path)
    ad["path"] = path
    ad["lora"] = {k: v.to(map_location) for k, v in ad["lora"].items()}
    return ad


def _read_safetensors(file, where):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= 100_000_000 else None
        if not isinstance(header, dict):
            raise ValueError("no safetensors header")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ is not a map of strings")
        tensors = load_file(file)
    except (SafetensorError, ValueError, OSError, RuntimeError, UnicodeDecodeError, OverflowError) as e:
        # SafetensorError for bad offsets and truncation, ValueError/UnicodeDecodeError for a header
        # that is not JSON, RuntimeError for a dtype torch cannot view
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LoraError(f"{where!r} is not a readable safetensors file (truncated or corrupt? {reason}); "
                        "re-create it") from None
    expected = meta.get(f"{META}content_sha256")
    if expected is not None and content_hash(tensors) != expected:
        raise LoraError(f"{where!r} is corrupt: content hash differs from the one in its header; re-create it")
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise LoraError(f"{where!r}: tensor {k} holds NaN or infinite values; the adapter is unusable")
        if not v.is_floating_point():
            raise LoraError(f"{where!r}: tensor {k} has dtype {v.dtype}, not floating point")
    return tensors, meta


def _load_safetensors(file, where):
    tensors, meta = _read_safetensors(file, where)
    if not tensors:
        raise LoraError(f"{where!r} holds no tensors")
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors):
        return _from_peft(tensors, meta, os.path.join(os.path.dirname(file), CONFIG_NAME), where)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in tensors):
        return _from_kohya(tensors, meta, where)
    raise LoraError(f"{where!r}: its keys match neither PEFT's layout (base_model.model.<module>.lora_A.weight) "
                    f"nor kohya's (lora_unet_<module>.lora_down.weight), e.g. {sorted(tensors)[:3]}")


def _number(meta, key, where, cast=float):
    try:
        v = cast(meta[key])
    except (TypeError, ValueError):
        raise LoraError(f"{where!r}: header field {key} = {meta[key]!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise LoraError(f"{where!r}: header field {key} = {meta[key]!r} must be a positive number")
    return v


def _pairs(tensors, down, up, where):
    """{module: (A (r, in), B (out, r))} from keys ``module + down`` / ``module + up``; checks pairs and ranks."""
    mods = {}
    for k in tensors:
        for suffix, i in ((down, 0), (up, 1)):
            if k.endswith(suffix):
                mods.setdefault(k[:-len(suffix)], [None, None])[i] = tensors[k]
    for m, (a, b) in mods.items():
        if a is None or b is None:
            raise LoraError(f"{where!r}: module {m} has {'no ' + down if a is None else 'no ' + up} tensor")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{where!r}: module {m} has shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                            "not (r, in) and (out, r)")
    return mods


def _from_peft(tensors, meta, config_path, where):
    stray = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if stray:
        raise LoraError(f"{where!r} holds tensors plain LoRA does not have (DoRA, biases, saved modules?): "
                        f"{stray[:3]}; only lora_A/lora_B adapters are supported")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise LoraError(f"{where!r}: {CONFIG_NAME} is missing beside the tensors; it holds r and alpha, "
                        "which the tensors alone cannot give") from None
    except (ValueError, OSError) as e:
        raise LoraError(f"{where!r}: {CONFIG_NAME} is not readable JSON ({str(e)[:120]}); re-create it") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise LoraError(f"{where!r}: {CONFIG_NAME} is a {found!r} adapter, not LoRA")
    for key, why in (("use_dora", "DoRA's magnitude vectors are"), ("modules_to_save", "fully saved modules are"),
                     ("rank_pattern", "per-layer ranks are"), ("alpha_pattern", "per-layer alphas are")):
        if cfg.get(key):
            raise LoraError(f"{where!r}: {CONFIG_NAME} sets {key} = {cfg[key]!r}; {why} not supported here")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{where!r}: {CONFIG_NAME} sets bias = {cfg['bias']!r}; trained biases are not supported")
    notes = []
    try:
        r = int(cfg["r"])
        if "lora_alpha" in cfg:
            alpha = float(cfg["lora_alpha"])
        else:
            alpha = 8.0  # PEFT's LoraConfig default: what PEFT itself would load
            notes.append(f"{CONFIG_NAME} has no lora_alpha; assumed PEFT's default 8")
    except (KeyError, TypeError, ValueError):
        raise LoraError(f"{where!r}: {CONFIG_NAME} lacks a whole-number r or a numeric lora_alpha") from None
    if r <= 0 or not math.isfinite(alpha) or alpha <= 0:
        raise LoraError(f"{where!r}: {CONFIG_NAME} has r={r}, lora_alpha={alpha}; both must be positive")
    if cfg.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r
        alpha = alpha * math.sqrt(r)
        notes.append(f"use_rslora: alpha taken as lora_alpha * sqrt(r) = {alpha:g}")
    lora = {}
    for key, (a, b) in _pairs(tensors, ".lora_A.weight", ".lora_B.weight", where).items():
        if not key.startswith(PEFT_PREFIX):
            raise LoraError(f"{where!r}: key {key}.lora_A.weight does not start with {PEFT_PREFIX!r}")
        if a.shape[0] != r:
            raise LoraError(f"{where!r}: {key}.lora_A.weight has shape {tuple(a.shape)}, inconsistent with r={r} "
                            f"in {CONFIG_NAME}")
        m = key[len(PEFT_PREFIX):]
        lora[f"{m}.lora_a"], lora[f"{m}.lora_b"] = a.float().T.contiguous(), b.float().T.contiguous()
    for key, value in ((f"{META}r", r), (f"{META}lora_alpha", alpha)):
        if key in meta and _number(meta, key, where) != value:
            raise LoraError(f"{where!r}: {CONFIG_NAME} says {key[len(META):]} = {value:g}, the tensors' header "
                            f"{meta[key]}: the two files come from different saves (an interrupted write?); "
                            "re-create the adapter")
    targets = cfg.get("target_modules")
    targets = list(targets) if isinstance(targets, list) else None
    return make_adapter(lora, r, alpha, targets, meta.get(f"{META}base_fingerprint"), meta.get(f"{META}style"),
                        fmt="peft", dropout=float(cfg.get("lora_dropout") or 0.0), notes=notes)


def _from_kohya(tensors, meta, where):
    stray = [k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if stray:
        raise LoraError(f"{where!r} holds tensors plain LoRA does not have (LoHa, LoKr, DoRA?): {stray[:3]}")
    mods = _pairs(tensors, ".lora_down.weight", ".lora_up.weight", where)
    foreign = [m for m in mods if not m.startswith(KOHYA_PREFIX)]
    if foreign:
        raise LoraError(f"{where!r}: keys {foreign[:3]} name no UNet module (lora_unet_...); a text encoder's "
                        "LoRA does not apply to this model")
    notes, scales, ranks = [], {}, {}
    for m, (a, _) in mods.items():
        r_m = a.shape[0]
        alpha_t = tensors.get(f"{m}.alpha")
        if alpha_t is None:
            alpha_m = float(r_m)  # kohya's convention: no alpha tensor means alpha = rank, a scale of 1
        else:
            alpha_m = float(alpha_t.reshape(-1)[0]) if alpha_t.numel() == 1 else float("nan")
            if not math.isfinite(alpha_m) or alpha_m <= 0:
                raise LoraError(f"{where!r}: {m}.alpha must be one positive number")
        ranks[m], scales[m] = r_m, alpha_m / r_m
    missing_alpha = [m for m in mods if f"{m}.alpha" not in tensors]
    if missing_alpha:
        notes.append(f"{len(missing_alpha)} of {len(mods)} modules have no alpha tensor; assumed alpha = rank "
                     "(kohya's convention: scale 1)")
    r = max(ranks.values())
    uniform = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1
    alpha = next(iter(scales.values())) * r if uniform else float(r)
    lora = {}
    for m, (a, b) in mods.items():
        a, b = a.float().T, b.float().T  # (in, r_m), (r_m, out)
        if not uniform:
            # per-module ranks or alphas: pad to the largest rank with zeros and fold each module's own
            # scale into B, with alpha = r (scale 1); the update is unchanged
            a = torch.cat([a, a.new_zeros(a.shape[0], r - ranks[m])], 1)
            b = torch.cat([b * scales[m], b.new_zeros(r - ranks[m], b.shape[1])], 0)
        lora[f"{m}.lora_a"], lora[f"{m}.lora_b"] = a.contiguous(), b.contiguous()
    if not uniform:
        notes.append(f"modules differ in rank or alpha; padded to rank {r} with each module's scale folded into B")
    ad = make_adapter(lora, r, alpha, None, meta.get(f"{META}base_fingerprint"), meta.get(f"{META}style"),
                      fmt="kohya", notes=notes)
    ad["targets"] = None  # known once the names are mapped onto a model (resolve_kohya_names)
    return ad


def _load_legacy(path):
    """The single torch .pt file that earlier versions wrote (format 1): tensors already in our layout."""
    try:
        ad = load_checkpoint(path, "cpu", kind="lora")
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    for key in ("lora", "r", "alpha", "targets", "base_fingerprint"):
        if key not in ad:
            raise LoraError(f"adapter {path!r} lacks {key!r}; it is corrupt or from another tool; re-create it")
    if not isinstance(ad["targets"], (list, tuple)) or not all(isinstance(t, str) for t in ad["targets"]):
        raise LoraError(f"adapter {path!r}: 'targets' is not a list of layer names; re-create it")
    if not isinstance(ad["r"], int) or not isinstance(ad["alpha"], (int, float)) or not math.isfinite(ad["alpha"]):
        raise LoraError(f"adapter {path!r}: r and alpha are not numbers; re-create it")
    lora = ad["lora"]
    if not isinstance(lora, dict) or not lora or not all(isinstance(v, torch.Tensor) for v in lora.values()):
        raise LoraError(f"adapter {path!r}: its 'lora' entry is not a map of tensors; re-create it")
    for k, v in lora.items():
        if k.endswith("lora_a") and v.shape[1] != ad["r"] or k.endswith("lora_b") and v.shape[0] != ad["r"]:
            raise LoraError(f"adapter {path!r}: {k} has shape {tuple(v.shape)}, inconsistent with r={ad['r']}")
        if not torch.isfinite(v).all():
            raise LoraError(f"adapter {path!r}: tensor {k} holds NaN or infinite values; the adapter is unusable")
    cfg = ad.get("config", {})
    out = make_adapter({k: v.float() for k, v in lora.items()}, ad["r"], ad["alpha"], ad["targets"],
                       ad["base_fingerprint"], ad.get("style", cfg.get("style")), fmt="legacy-pt",
                       dropout=cfg.get("lora_dropout", 0.0))
    out["legacy"] = ad  # its optimizer state and RNG, for --resume from an old file
    return out


def load_training_state(path):
    """What lora_finetune.py --resume needs beside the adapter: optimizer, RNG, step, configs, and the tensors."""
    path = str(path)
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        legacy = _load_legacy(path)["legacy"]
        return {k: legacy[k] for k in ("lora", "optimizer", "rng", "step", "epoch", "config", "train_config")
                if k in legacy}
    state_path = os.path.join(path, STATE_NAME)
    if not os.path.exists(state_path):
        raise LoraError(f"{path!r} has no {STATE_NAME}: --resume needs the folder lora_finetune.py wrote "
                        "(a shared adapter carries no training state)")
    try:
        return load_checkpoint(state_path, "cpu", kind="lora_state")
    except CheckpointError as e:
        raise LoraError(str(e)) from None


# ------------------------------------------------- names, several adapters

def resolve_kohya_names(adapter, model):
    """Map kohya's flattened names (dots became underscores) back through the model's own module names.

    Two of the model's modules that flatten to the same name make the mapping ambiguous: refused."""
    if adapter["format"] != "kohya" or adapter.get("targets") is not None:
        return adapter
    flat = {}
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, LoraLayer)) and not (n.endswith(".net") or ".net." in n):
            flat.setdefault(kohya_name(n), []).append(n)
    lora, unknown = {}, []
    for m in adapter["modules"]:
        names = flat.get(m)
        if not names:
            unknown.append(m)
            continue
        if len(names) > 1:
            raise LoraError(f"{adapter['path']!r}: kohya name {m} is ambiguous on this model: it could be "
                            f"{' or '.join(names)}")
        for part in ("lora_a", "lora_b"):
            lora[f"{names[0]}.{part}"] = adapter["lora"][f"{m}.{part}"]
    if unknown:
        what = "none" if len(unknown) == len(adapter["modules"]) else f"{len(unknown)}"
        raise LoraError(f"{adapter['path']!r}: {what} of its {len(adapter['modules'])} modules match this model's "
                        f"layers, e.g. {unknown[:2]}; it was made for another model")
    out = dict(adapter, lora=lora, modules=modules_of(lora))
    out["targets"] = sorted({m.rsplit(".", 1)[-1] for m in out["modules"]})
    return out


def parse_lora_spec(spec):
    """'PATH' or 'PATH:WEIGHT' -> (path, weight). The weight must be a finite number."""
    spec = str(spec)
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            weight = float(tail)
        except ValueError:
            if os.path.exists(spec):  # a path with a colon in it
                return spec, 1.0
            raise CLIError(f"--lora {spec!r}: the weight {tail!r} is not a number; write PATH or PATH:WEIGHT, "
                           "e.g. out/lora:0.8") from None
        if not math.isfinite(weight):
            raise CLIError(f"--lora {spec!r}: the weight must be a finite number, got {tail!r}")
        return head, weight
    return spec, 1.0


def load_adapters(specs, map_location="cpu", log=print):
    """Parse every --lora PATH[:WEIGHT] first (bad flags fail before any file is read), then load each.

    The default path (out/lora) falls back to an old out/lora.pt when only that exists."""
    parsed = [parse_lora_spec(s) for s in specs]
    out = []
    for path, weight in parsed:
        if path == DEFAULT_ADAPTER and not os.path.exists(path) and os.path.exists(LEGACY_DEFAULT_ADAPTER):
            log(f"lora: using the old {LEGACY_DEFAULT_ADAPTER}; convert it once with: python lora_tools.py "
                f"convert {LEGACY_DEFAULT_ADAPTER} {DEFAULT_ADAPTER}")
            path = LEGACY_DEFAULT_ADAPTER
        ad = load_adapter(path, map_location)
        for note in ad["notes"]:
            log(f"lora: {path}: {note}")
        ad["weight"] = weight
        out.append(ad)
    return out


def check_same_base(adapters):
    """Adapters trained on different bases cannot be meant for one model: refuse naming both."""
    known = [(a["path"], a["base_fingerprint"]) for a in adapters if a.get("base_fingerprint")]
    for path, fp in known[1:]:
        if fp != known[0][1]:
            raise LoraError(f"adapters {known[0][0]!r} and {path!r} were trained on different bases "
                            f"({known[0][1]} vs {fp}); use adapters of one base (or --force)")


def attach_adapters(model, adapters, base_fingerprint, force=False):
    """Apply several adapters, each at its own weight (``adapter["weight"]``, default 1), to one model.

    Each is checked against the base fingerprint; names are made unique from the paths."""
    if not force:
        check_same_base(adapters)
    names = []
    for ad in adapters:
        name = os.path.basename(os.path.normpath(str(ad.get("path") or "adapter"))) or "adapter"
        while name in names:
            name += "+"
        names.append(name)
        apply_adapter(model, resolve_kohya_names(ad, model), base_fingerprint, force=force, name=name,
                      weight=ad.get("weight", 1.0))
    return names
