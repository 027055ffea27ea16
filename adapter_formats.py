"""Adapter files: the folder people share (PEFT's layout), kohya's single file, the old .pt, and training state.

    out/lora/adapter_model.safetensors   per adapted module M: base_model.model.M.lora_A.weight and
                                         ...lora_B.weight in PEFT's names and shapes (Linear: (r, in) and
                                         (out, r); Conv2d: (r, in, k, k) and (out, r, 1, 1)); the header's
                                         __metadata__ holds what only we know: the base fingerprint, path and
                                         name, the style, this format's version and a hash of the tensor data
    out/lora/adapter_config.json         PEFT's LoraConfig: peft_type LORA, r, lora_alpha, target_modules (the
                                         adapted modules' names), base_model_name_or_path (the base's path), ...
    out/lora/training_state.pt           for lora_finetune.py --resume only: optimizer, RNG, step, configs;
                                         never needed to use or share the adapter
    NAME.safetensors                     kohya sd-scripts' layout (lora_unet_M.lora_down/lora_up/alpha)
    NAME.pt                              format 1, a single torch file: read, and converted by lora_tools.py

    write_adapter("out/lora", adapter_from_model(model, ad), TrainingState(...))
    ad = load_adapter("out/lora")        # a folder, a kohya .safetensors or an old .pt; else one LoraError
    adapters = load_adapters(args.lora)  # cli.LoraSpec (PATH[:WEIGHT], parsed by the command line) -> Adapters
    find_adapter("italic", ["out", "~/adapters"])   # <lora:italic:0.8>: the folder named so under those roots

Every header field is checked before use; every problem is one LoraError naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil

import torch

from adapter import (KINDS, KOHYA_PREFIX, SAVED_MODULES, Adapter, TrainingState, adapter_name, content_hash,
                     kohya_name)
from checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from config import DEFAULT_ADAPTER, DEFAULT_OUT_DIR, R_MAX, STYLES, valid_r
from files import atomic_write, temp_folder
from errors import CLIError
from lora import LoraError

ADAPTER_FORMAT_VERSION = 2  # 1 was the single torch .pt file
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_DEPTH = 4  # folders below a root searched for adapters (the page's list, <lora:NAME:W>)
CONFIG_NAME = "adapter_config.json"
STATE_NAME = "training_state.pt"
LEGACY_DEFAULT_ADAPTER = os.path.join(DEFAULT_OUT_DIR, "lora.pt")  # where DEFAULT_ADAPTER was before format 2
META = "mnist_sd."  # prefix of our own header fields, apart from PEFT's and kohya's
PEFT_PREFIX = "base_model.model."
# the layout of the tensors a training state carries: 2 is PEFT's (M.lora_A (r, in)); states without the key
# were written with (in, r) tensors named M.lora_a, and their optimizer moments in that layout too
STATE_LAYOUT = 2
# alpha / r above this multiplies the update a thousandfold: no trained adapter does that, a damaged field (1e308) does
SCALE_MAX = 1000.0
STYLE_RE = re.compile(rf"^({'|'.join(STYLES)}|(font|data):.+)$")  # config.STYLES, or a font's or data set's name


def adapter_size(path):
    """Bytes a user shares: the safetensors file and its config (the training state stays home)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in (WEIGHTS_NAME, CONFIG_NAME)
                   if os.path.exists(os.path.join(path, n)))
    return os.path.getsize(path)


# --------------------------------------------------------------------- writing

def peft_config(adapter):
    """adapter_config.json as PEFT's LoraConfig writes it (the fields it needs to rebuild the layers)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": adapter.base_path, "r": adapter.r,
            "lora_alpha": adapter.alpha, "target_modules": list(adapter.targets or adapter.modules),
            "lora_dropout": adapter.dropout, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in adapter.saved_modules}) or None,
            "inference_mode": True}


def _metadata(adapter, tensors, **extra):
    meta = {"format": "pt", f"{META}format_version": str(ADAPTER_FORMAT_VERSION),
            f"{META}content_sha256": content_hash(tensors), f"{META}r": str(adapter.r),
            f"{META}lora_alpha": repr(adapter.alpha),
            f"{META}target_modules": json.dumps(list(adapter.targets or adapter.modules))}
    for key, value in (("base_fingerprint", adapter.base_fingerprint), ("base_path", adapter.base_path),
                       ("base_name", adapter.base_name), ("style", adapter.style), ("kind", adapter.kind)):
        if value:
            meta[f"{META}{key}"] = value
    meta.update(extra)
    return meta


def save_safetensors(tensors, path, metadata):
    """safetensors' file with the header's metadata in name order: the same adapter gives the same bytes.

    safetensors keeps the metadata in a hash map, so its order (and the file's hash) changed from run to
    run; the header is re-serialised with sorted keys, padded to its original length."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # as safetensors writes it
    if len(text) <= n:
        data = data[:8] + text + b" " * (n - len(text)) + data[8 + n:]

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def check_adapter_folder(path):
    """An adapter is a folder now: refuse a path that is a file (an old lora.pt) before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{path!r} is a file, but an adapter is written as a folder (PEFT's layout); choose "
                       f"another path, e.g. {DEFAULT_ADAPTER} (an old .pt converts with: python lora_tools.py "
                       f"convert {path} --out {DEFAULT_ADAPTER})")


def write_adapter(folder, adapter, training_state=None):
    """Write adapter_model.safetensors + adapter_config.json (+ training_state.pt) into ``folder``.

    Everything is written into a fresh temporary folder beside ``folder`` first. A new ``folder``
    is then one os.rename: all or nothing. An existing one (every epoch of a fine-tune rewrites
    it) is updated file by file with os.replace, the training state first and the config last:
    each file is always whole, and a crash between two replaces can only pair files from two
    consecutive saves of the same run (same r, alpha and targets). The header repeats r and alpha,
    so load_adapter names any other mix instead of using it, and the training state
    carries its own copy of the tensors, so --resume never depends on the shared file."""
    check_adapter_folder(folder)
    tensors = {f"{PEFT_PREFIX}{k}.weight": v.detach().float().cpu().contiguous() for k, v in adapter.tensors.items()}
    # a saved module under its own name, as PEFT writes modules_to_save: base_model.model.w_embed.weight
    tensors.update({f"{PEFT_PREFIX}{k}": v.detach().float().cpu().contiguous() for k, v in adapter.saved_modules.items()})
    tmp = temp_folder(folder)  # named so that a later run removes it, should this one be killed
    try:
        meta = _metadata(adapter, tensors)
        save_safetensors(tensors, os.path.join(tmp, WEIGHTS_NAME), meta)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(peft_config(adapter), f, indent=2)
            f.write("\n")
        names = [WEIGHTS_NAME, CONFIG_NAME]
        if training_state is not None:
            state = dataclasses.asdict(training_state)
            state["lora"] = {k: v.detach().cpu().clone() for k, v in state.pop("tensors").items()}
            save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "lora_state", "layout": STATE_LAYOUT,
                             "adapter_sha256": meta[f"{META}content_sha256"], **state}, os.path.join(tmp, STATE_NAME))
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


def write_kohya(path, adapter):
    """One .safetensors file in kohya sd-scripts' layout: lora_down = A (r, in[, k, k]), lora_up = B (out, r[, 1, 1]),
    and a 0-dim alpha per module."""
    tensors = {}
    for m in adapter.modules:
        k = kohya_name(m)
        a, b = adapter.pair(m)
        tensors[f"{k}.lora_down.weight"] = a.float().cpu().contiguous()
        tensors[f"{k}.lora_up.weight"] = b.float().cpu().contiguous()
        tensors[f"{k}.alpha"] = torch.tensor(float(adapter.alpha))
    for k, v in adapter.saved_modules.items():  # kohya has no such field: the module's own name, prefixed
        tensors[KOHYA_PREFIX + k] = v.float().cpu().contiguous()
    meta = _metadata(adapter, tensors, ss_network_module="networks.lora", ss_network_dim=str(adapter.r),
                     ss_network_alpha=repr(adapter.alpha), ss_base_model_version="mnist_sd_unet",
                     ss_training_comment=f"style {adapter.style or 'unknown'}")
    save_safetensors(tensors, path, meta)
    return path


# --------------------------------------------------------------------- reading

def load_adapter(path, map_location="cpu"):
    """Read any adapter we know: a PEFT folder (or its .safetensors), a kohya .safetensors, an old .pt.

    Every problem (missing, truncated, corrupt, a header field out of range, another tool's layout we
    cannot use) is one LoraError naming the file; nothing is assumed silently (see the adapter's ``notes``)."""
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
        ad = _load_legacy(path)[0]
    ad.path = path
    ad.tensors = {k: v.to(map_location) for k, v in ad.tensors.items()}
    ad.saved_modules = {k: v.to(map_location) for k, v in ad.saved_modules.items()}
    return ad


def find_adapter_folders(root, skip=()):
    """Folders under ``root`` holding an adapter (adapter_model.safetensors), hidden folders and ``skip`` left out, at
    most ADAPTER_DEPTH below it; the page lists these, <lora:NAME:W> looks among them. Symlinked folders are not
    followed: a link inside a root can point anywhere."""
    found = []
    root = os.path.realpath(root)
    skip = {os.path.realpath(s) for s in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip)
        if dirpath.count(os.sep) - root.count(os.sep) >= ADAPTER_DEPTH:
            dirnames[:] = []
        if WEIGHTS_NAME in filenames and os.path.realpath(dirpath) not in skip:
            found.append(dirpath)
    return found


def find_adapter(name, roots, where="<lora:NAME>"):
    """The adapter folder ``name`` names under ``roots`` (find_adapter_folders): its folder's name (``italic``, or
    ``my_font`` for my.font, as the page's sliders call it) or its path below a root (``app/adapters/serif``). None
    found, or two, is a LoraError listing the names there."""
    found = {}  # folder (resolved) -> its path below its root
    for root in filter(os.path.isdir, roots):
        for folder in find_adapter_folders(root):
            found.setdefault(os.path.realpath(folder), os.path.relpath(folder, os.path.realpath(root)))
    wanted, shown_roots = name.strip().strip("/"), ", ".join(map(str, roots))
    hits = [f for f, rel in found.items() if wanted in (rel, os.path.basename(f), adapter_name(f))]
    if len(hits) > 1:
        raise LoraError(f"{where}: {len(hits)} adapters are named {name!r} under {shown_roots} "
                        f"({', '.join(sorted(found[h] for h in hits))}); name one by its path below its folder")
    if not hits:
        names = ", ".join(sorted({os.path.basename(f) for f in found})) or "none"
        raise LoraError(f"{where}: no adapter named {name!r} under {shown_roots}; the adapters there: {names} "
                        "(--lora-dir FOLDER looks in another folder, --lora PATH:WEIGHT takes a folder itself)")
    return hits[0]


def load_adapters(specs, map_location="cpu", log=print):
    """Load every adapter of ``specs`` (cli.LoraSpec: PATH[:WEIGHT], parsed and checked by the command line),
    each at its weight.

    The default path (out/lora) falls back to an old out/lora.pt when only that exists."""
    out = []
    for spec in specs:
        path, weight = spec.path, spec.weight
        if path == DEFAULT_ADAPTER and not os.path.exists(path) and os.path.exists(LEGACY_DEFAULT_ADAPTER):
            log(f"lora: using the old {LEGACY_DEFAULT_ADAPTER}; convert it once with: python lora_tools.py "
                f"convert {LEGACY_DEFAULT_ADAPTER} --out {DEFAULT_ADAPTER}")
            path = LEGACY_DEFAULT_ADAPTER
        ad = load_adapter(path, map_location)
        for note in ad.notes:
            log(f"lora: {path}: {note}")
        ad.weight = weight
        out.append(ad)
    return out


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


# ------------------------------------------------- header fields, each checked before use

def _bad(where, source, key, value, rule):
    return LoraError(f"{where!r}: {source} field {key} = {value!r} {rule}; correct the field or re-create the "
                     "adapter")


def check_r_field(value, where, source, key="r"):
    """The rank r of a file's field (config.valid_r), a header's string "4" read as 4 (its "2.7" is not one)."""
    if isinstance(value, str):
        value = int(value) if re.fullmatch(r"\d{1,6}", value.strip()) else value
    if valid_r(value) is None:
        raise _bad(where, source, key, value, f"must be a whole number from 1 to {R_MAX}")
    return value


def check_alpha(value, where, source, r, key="lora_alpha"):
    """A positive number with alpha / r at most SCALE_MAX."""
    raw = value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0
            or value / r > SCALE_MAX):
        raise _bad(where, source, key, raw, f"must be a positive number with {key} / r at most {SCALE_MAX:g}")
    return float(value)


def check_dropout(value, where, source, key="lora_dropout"):
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise _bad(where, source, key, value, "must be a number in [0, 1)")
    return float(value)


def check_style(value, where, source, key="style"):
    """none | italic | bold | font:NAME | data:NAME, or absent; evaluate.py and the app rebuild the data from it."""
    if value is None:
        return None
    if not isinstance(value, str) or not STYLE_RE.match(value):
        raise _bad(where, source, key, value, f"must be {', '.join(STYLES)}, font:NAME or data:NAME")
    return value


def _text(value, where, source, key):
    if value is not None and not isinstance(value, str):
        raise _bad(where, source, key, value, "must be a string")
    return value or None


def _saved_modules(tensors, prefix, listed, where):
    """The tensors of fully saved modules (SAVED_MODULES, those ``listed``) under ``prefix``, taken out of
    ``tensors``; returns {name.weight: tensor}."""
    unknown = [m for m in listed if m not in SAVED_MODULES]
    if unknown:
        raise LoraError(f"{where!r}: fully saved modules {unknown} are not supported here (only "
                        f"{', '.join(SAVED_MODULES)}, a speed adapter's guidance input)")
    out = {}
    for k in [k for k in tensors if k.startswith(prefix) and k[len(prefix):].rsplit(".", 1)[0] in listed]:
        out[k[len(prefix):]] = tensors.pop(k).float().contiguous()
    return out


def _kind(meta, where):
    kind = meta.get(f"{META}kind")
    if kind is not None and kind not in KINDS:
        raise _bad(where, "header", f"{META}kind", kind, f"must be one of {', '.join(KINDS)} or absent")
    return kind


def _from_peft(tensors, meta, config_path, where):
    try:
        with open(config_path) as f:
            listed = json.load(f).get("modules_to_save") or []
    except (OSError, ValueError, AttributeError):  # read again, and named, below
        listed = []
    listed = listed if isinstance(listed, list) and all(isinstance(m, str) for m in listed) else []
    tensors = dict(tensors)
    saved = _saved_modules(tensors, PEFT_PREFIX, listed, where) if listed else {}
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
    if cfg.get("modules_to_save") and not saved:
        raise LoraError(f"{where!r}: {CONFIG_NAME} sets modules_to_save = {cfg['modules_to_save']!r}; fully saved "
                        "modules are not supported here")
    for key, why in (("use_dora", "DoRA's magnitude vectors are"), ("rank_pattern", "per-layer ranks are"), ("alpha_pattern", "per-layer alphas are")):
        if cfg.get(key):
            raise LoraError(f"{where!r}: {CONFIG_NAME} sets {key} = {cfg[key]!r}; {why} not supported here")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{where!r}: {CONFIG_NAME} sets bias = {cfg['bias']!r}; trained biases are not supported")
    notes = []
    if "r" not in cfg:
        raise LoraError(f"{where!r}: {CONFIG_NAME} lacks the rank r, which the tensors alone cannot give")
    r = check_r_field(cfg["r"], where, CONFIG_NAME)
    if "lora_alpha" in cfg:
        alpha = check_alpha(cfg["lora_alpha"], where, CONFIG_NAME, r)
    else:
        alpha = 8.0  # PEFT's LoraConfig default: what PEFT itself would load
        notes.append(f"{CONFIG_NAME} has no lora_alpha; assumed PEFT's default 8")
    if cfg.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r
        alpha = alpha * math.sqrt(r)
        notes.append(f"use_rslora: alpha taken as lora_alpha * sqrt(r) = {alpha:g}")
    dropout = check_dropout(cfg.get("lora_dropout"), where, CONFIG_NAME)
    out = {}
    for key, (a, b) in _pairs(tensors, ".lora_A.weight", ".lora_B.weight", where).items():
        if not key.startswith(PEFT_PREFIX):
            raise LoraError(f"{where!r}: key {key}.lora_A.weight does not start with {PEFT_PREFIX!r}")
        if a.shape[0] != r:
            raise LoraError(f"{where!r}: {key}.lora_A.weight has shape {tuple(a.shape)}, inconsistent with r={r} "
                            f"in {CONFIG_NAME}")
        m = key[len(PEFT_PREFIX):]
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = a.float().contiguous(), b.float().contiguous()
    if f"{META}r" in meta and check_r_field(meta[f"{META}r"], where, "header", f"{META}r") != r or (
            f"{META}lora_alpha" in meta and not cfg.get("use_rslora")
            and check_alpha(meta[f"{META}lora_alpha"], where, "header", r, f"{META}lora_alpha") != alpha):
        raise LoraError(f"{where!r}: {CONFIG_NAME} says r = {r}, lora_alpha = {alpha:g}, the tensors' header "
                        f"{meta.get(f'{META}r')}, {meta.get(f'{META}lora_alpha')}: the two files come from different "
                        "saves (an interrupted write?); re-create the adapter")
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and not all(isinstance(t, str) and t for t in targets):
        raise _bad(where, CONFIG_NAME, "target_modules", targets, "must be a list of module names")
    if isinstance(targets, list):
        # PEFT's rule: a target names a module, or the end of its dotted name; every module the tensors adapt
        # must be one a target names (a target may name more: PEFT lists layers some models lack)
        modules = sorted({k.rsplit(".", 1)[0] for k in out})
        unmatched = [m for m in modules if not any(m == t or m.endswith("." + t) for t in targets)]
        if unmatched:
            raise _bad(where, CONFIG_NAME, "target_modules", targets if len(str(targets)) < 120 else "[...]",
                       f"names none of the modules {unmatched[:2]} the tensors adapt")
    else:  # absent (or PEFT's regex string): the tensors say which modules are adapted
        targets = sorted({k.rsplit(".", 1)[0] for k in out})
    base_path = _text(cfg.get("base_model_name_or_path"), where, CONFIG_NAME, "base_model_name_or_path")
    return Adapter(out, r, alpha, targets=list(targets),
                   style=check_style(meta.get(f"{META}style"), where, "header", f"{META}style"),
                   base_fingerprint=meta.get(f"{META}base_fingerprint"),
                   base_path=meta.get(f"{META}base_path") or base_path, base_name=meta.get(f"{META}base_name"),
                   dropout=dropout, format="peft", notes=notes, kind=_kind(meta, where), saved_modules=saved)


def _pairs(tensors, down, up, where):
    """{module: (A, B)} from keys ``module + down`` / ``module + up``; checks pairs, ranks and shapes:
    A (r, in) and B (out, r) for a Linear, A (r, in, k, k) and B (out, r, 1, 1) for a Conv2d."""
    mods = {}
    for k in tensors:
        for suffix, i in ((down, 0), (up, 1)):
            if k.endswith(suffix):
                mods.setdefault(k[:-len(suffix)], [None, None])[i] = tensors[k]
    for m, (a, b) in mods.items():
        if a is None or b is None:
            raise LoraError(f"{where!r}: module {m} has {'no ' + down if a is None else 'no ' + up} tensor")
        linear = a.dim() == b.dim() == 2
        conv = a.dim() == b.dim() == 4 and tuple(b.shape[2:]) == (1, 1)
        if not (linear or conv) or a.shape[0] != b.shape[1]:
            raise LoraError(f"{where!r}: module {m} has shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                            "not (r, in) and (out, r), nor (r, in, k, k) and (out, r, 1, 1)")
    return mods


def _from_kohya(tensors, meta, where):
    tensors = dict(tensors)
    saved = _saved_modules(tensors, KOHYA_PREFIX, SAVED_MODULES, where)
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
        r_m = check_r_field(a.shape[0], where, "tensor", f"{m}.lora_down.weight's rank")
        alpha_t = tensors.get(f"{m}.alpha")
        if alpha_t is None:
            alpha_m = float(r_m)  # kohya's convention: no alpha tensor means alpha = rank, a scale of 1
        else:
            alpha_m = float(alpha_t.reshape(-1)[0]) if alpha_t.numel() == 1 else float("nan")
            if not math.isfinite(alpha_m) or alpha_m <= 0 or alpha_m / r_m > SCALE_MAX:
                raise LoraError(f"{where!r}: {m}.alpha must be one positive number with alpha / rank at most "
                                f"{SCALE_MAX:g}; correct it or re-create the file")
        ranks[m], scales[m] = r_m, alpha_m / r_m
    missing_alpha = [m for m in mods if f"{m}.alpha" not in tensors]
    if missing_alpha:
        notes.append(f"{len(missing_alpha)} of {len(mods)} modules have no alpha tensor; assumed alpha = rank "
                     "(kohya's convention: scale 1)")
    r = max(ranks.values())
    uniform = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1
    alpha = next(iter(scales.values())) * r if uniform else float(r)
    out = {}
    for m, (a, b) in mods.items():
        a, b = a.float(), b.float()
        if not uniform:
            # per-module ranks or alphas: pad to the largest rank with zeros and fold each module's own
            # scale into B, with alpha = r (scale 1); the update is unchanged
            pad = r - ranks[m]
            a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])], 0)
            b = torch.cat([b * scales[m], b.new_zeros(b.shape[0], pad, *b.shape[2:])], 1)
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = a.contiguous(), b.contiguous()
    if not uniform:
        notes.append(f"modules differ in rank or alpha; padded to rank {r} with each module's scale folded into B")
    # targets stay None: known once the names are mapped onto a model (resolve_kohya_names)
    return Adapter(out, r, alpha, style=check_style(meta.get(f"{META}style"), where, "header", f"{META}style"),
                   base_fingerprint=meta.get(f"{META}base_fingerprint"), base_path=meta.get(f"{META}base_path"),
                   base_name=meta.get(f"{META}base_name"), format="kohya", notes=notes, kind=_kind(meta, where),
                   saved_modules=saved)


def _old_layout(tensors):
    """(in, r) / (r, out) tensors named M.lora_a / M.lora_b (format 1, and training states before layout 2) in
    PEFT's shapes and names."""
    out = {}
    for k, v in tensors.items():
        m, part = k.rsplit(".", 1)
        out[f"{m}.{'lora_A' if part == 'lora_a' else 'lora_B'}"] = v.float().T.contiguous()
    return out


def _load_legacy(path):
    """The single torch .pt file that earlier versions wrote (format 1); returns (Adapter, the whole file)."""
    try:
        ad = load_checkpoint(path, "cpu", kind="lora")
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    for key in ("lora", "r", "alpha", "targets", "base_fingerprint"):
        if key not in ad:
            raise LoraError(f"adapter {path!r} lacks {key!r}; it is corrupt or from another tool; re-create it")
    if not isinstance(ad["targets"], (list, tuple)) or not all(isinstance(t, str) for t in ad["targets"]):
        raise LoraError(f"adapter {path!r}: 'targets' is not a list of layer names; re-create it")
    r = check_r_field(ad["r"], path, "file", "r")
    alpha = check_alpha(ad["alpha"], path, "file", r, "alpha")
    lora = ad["lora"]
    if not isinstance(lora, dict) or not lora or not all(isinstance(v, torch.Tensor) for v in lora.values()):
        raise LoraError(f"adapter {path!r}: its 'lora' entry is not a map of tensors; re-create it")
    for k, v in lora.items():
        if not k.endswith((".lora_a", ".lora_b")) or v.dim() != 2:
            raise LoraError(f"adapter {path!r}: {k} is not a LoRA tensor of format 1; re-create it")
        if k.endswith("lora_a") and v.shape[1] != r or k.endswith("lora_b") and v.shape[0] != r:
            raise LoraError(f"adapter {path!r}: {k} has shape {tuple(v.shape)}, inconsistent with r={r}")
        if not torch.isfinite(v).all():
            raise LoraError(f"adapter {path!r}: tensor {k} holds NaN or infinite values; the adapter is unusable")
    cfg = ad.get("config") if isinstance(ad.get("config"), dict) else {}
    tensors = _old_layout(lora)
    _pairs({f"{k}.weight": v for k, v in tensors.items()}, ".lora_A.weight", ".lora_B.weight", path)
    style = check_style(ad.get("style", cfg.get("style")), path, "file")
    out = Adapter(tensors, r, alpha, targets=list(ad["targets"]), style=style, base_fingerprint=ad["base_fingerprint"],
                  dropout=check_dropout(cfg.get("lora_dropout"), path, "file"), format="legacy-pt")
    return out, ad


def load_training_state(path):
    """What lora_finetune.py --resume needs beside the adapter: a TrainingState.

    States written before the layers took PEFT's shapes (and format-1 .pt files) are converted: their
    (in, r) tensors and the optimizer's moments for them are transposed, which resumes them exactly."""
    path = str(path)
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        state = _load_legacy(path)[1]
    else:
        state_path = os.path.join(path, STATE_NAME)
        if not os.path.exists(state_path):
            raise LoraError(f"{path!r} has no {STATE_NAME}: --resume needs the folder lora_finetune.py wrote "
                            "(a shared adapter carries no training state)")
        try:
            state = load_checkpoint(state_path, "cpu", kind="lora_state")
        except CheckpointError as e:
            raise LoraError(str(e)) from None
    missing = [k for k in ("lora", "optimizer", "rng", "step") if k not in state]
    if missing:
        raise LoraError(f"{path!r}: its training state lacks {missing}; it cannot be resumed, start afresh")
    tensors, optimizer = state["lora"], state["optimizer"]
    if state.get("layout", 1) < STATE_LAYOUT:
        tensors = _old_layout(tensors)
        optimizer = {**optimizer, "state": {i: {k: v.T.contiguous() if torch.is_tensor(v) and v.dim() == 2 else v
                                                for k, v in s.items()} for i, s in optimizer.get("state", {}).items()}}
    return TrainingState(tensors, optimizer, state["rng"], state["step"], epoch=state.get("epoch", 0),
                         config=state.get("config", {}), train_config=state.get("train_config", {}),
                         base_config=state.get("base_config"), data_size=state.get("data_size"))
