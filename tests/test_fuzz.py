"""Damaged and hostile files through the loaders: every one is refused with a UserError or loads intact.

Seeded mutations of a tiny checkpoint and a tiny adapter: byte flips, truncations, junk appended,
valid archives with the wrong contents, text files, and pickles whose loading would run code
(they would create a marker file). For each file the loader must either raise a UserError (the
scripts turn it into one line and exit code 2) or return exactly the original tensors: no
traceback, no silent load of damaged weights, no code run.
"""
import collections
import io
import json
import os
import pickle
import random
import shutil
import zipfile

import pytest
import torch

from adapter_formats import load_adapter, load_training_state
from checkpoint import load_checkpoint, load_model, save_checkpoint
from errors import UserError

MARKER = "code_ran.marker"


class RunsCode:
    """Unpickling this calls os.system, which would create the marker file: what a malicious checkpoint does."""

    def __init__(self, folder):
        self.cmd = f"touch {os.path.join(folder, MARKER)}"

    def __reduce__(self):
        return os.system, (self.cmd,)


class RunsCodeEval:
    def __init__(self, folder):
        self.src = f"open({os.path.join(folder, MARKER)!r}, 'w').close()"

    def __reduce__(self):
        return eval, (self.src,)


def flip(data, rng, n):
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] ^= rng.randrange(1, 256)
    return bytes(b)


def byte_mutations(data, rng, flips, truncations, appends):
    """(name, bytes) for random byte flips, truncations and appended junk of ``data``."""
    out = [(f"flip{i}", flip(data, rng, rng.choice((1, 1, 1, 2, 8)))) for i in range(flips)]
    cuts = [0, 1, 3, 22, len(data) - 1, len(data) - 22] + [rng.randrange(len(data)) for _ in range(truncations)]
    out += [(f"cut{n}", data[:n]) for n in cuts[:truncations]]
    junk = [b"\n", b"\0" * 4, b"PK\x05\x06" + bytes(18), os.urandom(0)] + [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(appends)]
    out += [(f"junk{i}", data + j) for i, j in enumerate(junk[:appends]) if j]
    return out


def text_files():
    return [("text", b"notes about my model\n"), ("empty", b""), ("bad", b"bad"),
            ("json", json.dumps({"kind": "base", "version": 1}).encode()), ("html", b"<html>404</html>\n")]


def code_pickles(folder, kind):
    """Files that would run code on load: through torch.save, plain pickle, and inside a torch zip."""
    evil, evil_eval = RunsCode(folder), RunsCodeEval(folder)
    out = []
    for i, payload in enumerate([{"kind": kind, "version": 1, "model": evil}, evil,
                                 {"kind": kind, "version": 1, "x": [evil_eval]}, evil_eval]):
        buf = io.BytesIO()
        torch.save(payload, buf)
        out.append((f"torch_pickle{i}", buf.getvalue()))
        out.append((f"raw_pickle{i}", pickle.dumps(payload, protocol=2)))
    # a well-formed torch zip whose data.pkl is replaced by a pickle that runs code
    buf = io.BytesIO()
    torch.save({"kind": kind, "version": 1}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    dst_buf = io.BytesIO()
    with zipfile.ZipFile(dst_buf, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = pickle.dumps(evil, protocol=2) if item.filename.endswith("data.pkl") else src.read(item)
            dst.writestr(item, data)
    out.append(("zip_with_code", dst_buf.getvalue()))
    return out


class Outcomes:
    def __init__(self):
        self.counts = collections.Counter()
        self.problems = []

    def check(self, name, load, same):
        try:
            loaded = load()
        except UserError as e:
            assert "\n" not in str(e), f"{name}: a message of more than one line"
            assert "weights_only" not in str(e) and "will likely succeed" not in str(e), f"{name}: unsafe advice"
            self.counts["refused"] += 1
            return
        except Exception as e:  # noqa: BLE001 -- what the test counts: anything but a UserError is a traceback
            self.counts["traceback"] += 1
            self.problems.append(f"{name}: traceback {type(e).__name__}: {str(e)[:200]}")
            return
        verdict = same(loaded)
        if verdict is True:
            self.counts["loaded intact"] += 1
        elif verdict is False:
            self.counts["silent damage"] += 1
            self.problems.append(f"{name}: loaded with damaged contents")
        else:  # intact weights, a named detail differs (counted apart, not a failure)
            self.counts[verdict] += 1


def tensors_equal(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ checkpoints

def checkpoint_cases(tiny_ckpt, folder, rng):
    data = open(tiny_ckpt, "rb").read()
    cases = [(f"bytes_{n}", d) for n, d in byte_mutations(data, rng, flips=60, truncations=12, appends=8)]
    cases += text_files()
    cases += code_pickles(folder, "base")
    good = torch.load(tiny_ckpt, weights_only=True)
    good.pop("content_sha256")
    first = next(iter(good["model"]))
    wrong = [
        {}, {"kind": "base"}, {"kind": "base", "version": 1},
        {**good, "model": [1, 2, 3]}, {**good, "model": {}}, {**good, "ema": {first: "not a tensor"}},
        {**good, "config": "tiny"}, {**good, "config": {**good["config"], "model": {"channels": "x"}}},
        {**good, "config": {**good["config"], "model": {**good["config"]["model"], "channels": (8, 32)}}},
        {**good, "config": {**good["config"], "diffusion": {"timesteps": -1}}},
        {**good, "step": "4"}, {**good, "data_size": 0},
        {**good, "ema": {**good["ema"], first: torch.full_like(good["ema"][first], float("nan"))}},
        {**good, "ema": {k: v.half() for k, v in good["ema"].items()}},
        {**good, "kind": "lora"}, {**good, "version": 2}, [good["model"]], torch.zeros(3),
        {**good, "content_sha256": "0" * 64},
    ]
    for i, obj in enumerate(wrong):
        buf = io.BytesIO()
        torch.save(obj, buf)
        cases.append((f"wrong_contents{i}", buf.getvalue()))
    return cases


def test_fuzzed_checkpoints_are_refused_or_load_intact(tiny_ckpt, tmp_path):
    rng = random.Random(0)
    cases = checkpoint_cases(tiny_ckpt, str(tmp_path), rng)
    good = torch.load(tiny_ckpt, weights_only=True)
    outcomes, raw = Outcomes(), Outcomes()
    for name, data in cases:
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)

        def same(loaded):
            model, ckpt = loaded
            return (tensors_equal(model.state_dict(), good["ema"]) and tensors_equal(ckpt["model"], good["model"])
                    and ckpt["step"] == good["step"])
        outcomes.check(name, lambda: load_model(str(path)), same)
        if name.startswith("bytes_"):  # a damaged copy of a real file: the raw contents too
            raw.check(name + " (file)", lambda: load_checkpoint(str(path)), lambda c: tensors_equal(
                c["model"], good["model"]) and tensors_equal(c["ema"], good["ema"]))
        path.unlink()
    assert len(cases) >= 100
    assert not os.path.exists(tmp_path / MARKER), "a pickle ran code"
    assert not outcomes.problems + raw.problems, (outcomes.problems + raw.problems)[:10]
    assert outcomes.counts["traceback"] == outcomes.counts["silent damage"] == 0
    print(f"checkpoints: {len(cases)} files through load_model: {dict(outcomes.counts)}; the "
          f"{sum(raw.counts.values())} damaged copies of a real file also through load_checkpoint: {dict(raw.counts)}")


def test_a_content_hash_protects_every_tensor(tiny_ckpt, tmp_path):
    """One changed value anywhere (weights, optimizer moments, RNG) is refused with the hash message."""
    good = torch.load(tiny_ckpt, weights_only=True)
    assert len(good["content_sha256"]) == 64
    for part in ("model", "ema"):
        changed = {**good, part: dict(good[part])}
        k = next(iter(changed[part]))
        changed[part][k] = changed[part][k].clone()
        changed[part][k].view(-1)[0] += 1e-6
        path = tmp_path / f"{part}.pt"
        torch.save(changed, path)
        with pytest.raises(UserError, match="corrupt: content hash differs"):
            load_checkpoint(str(path))
    changed = {**good, "step": 5}
    torch.save(changed, tmp_path / "step.pt")
    with pytest.raises(UserError, match="corrupt: content hash differs"):
        load_checkpoint(str(tmp_path / "step.pt"))
    # bf16 tensors hash by their bytes like any other
    save_checkpoint({"kind": "base", "x": torch.randn(5).bfloat16()}, str(tmp_path / "bf16.pt"))
    loaded = torch.load(tmp_path / "bf16.pt", weights_only=True)
    loaded["x"] = loaded["x"].clone()
    loaded["x"][0] = -loaded["x"][0]
    torch.save(loaded, tmp_path / "bf16.pt")
    with pytest.raises(UserError, match="corrupt: content hash differs"):
        load_checkpoint(str(tmp_path / "bf16.pt"))


def test_a_checkpoint_without_a_hash_still_loads(tiny_ckpt, tmp_path):
    """Files written before the hash existed load as before (their structure is still checked)."""
    old = torch.load(tiny_ckpt, weights_only=True)
    del old["content_sha256"]
    torch.save(old, tmp_path / "old.pt")
    model, ckpt = load_model(str(tmp_path / "old.pt"))
    assert tensors_equal(model.state_dict(), old["ema"]) and ckpt["step"] == old["step"]


def test_junk_after_the_archive_is_refused(tiny_ckpt, tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(open(tiny_ckpt, "rb").read() + b"hello")
    with pytest.raises(UserError, match="5 bytes follow the end of its zip archive"):
        load_checkpoint(str(path))


def test_code_in_a_pickle_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "base", "version": 1, "model": RunsCode(str(tmp_path))}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    assert str(e.value) == f"{str(path)!r} holds objects that are not allowed to load; it is not a base checkpoint " \
                           "this code can read"
    assert not os.path.exists(tmp_path / MARKER)


# ---------------------------------------------------------------------- adapters

def adapter_cases(tiny_adapter, tmp_path, rng):
    """(name, make) pairs; make(dest) builds the damaged adapter at ``dest`` and returns the path to load."""
    weights = os.path.join(tiny_adapter, "adapter_model.safetensors")
    config = os.path.join(tiny_adapter, "adapter_config.json")
    w_bytes, c_bytes = open(weights, "rb").read(), open(config, "rb").read()

    def folder_with(weights_data=None, config_data=None):
        def make(dest):
            shutil.copytree(tiny_adapter, dest)
            if weights_data is not None:
                with open(os.path.join(dest, "adapter_model.safetensors"), "wb") as f:
                    f.write(weights_data)
            if config_data is not None:
                with open(os.path.join(dest, "adapter_config.json"), "wb") as f:
                    f.write(config_data)
            return dest
        return make

    def single_file(data, suffix):
        def make(dest):
            path = str(dest) + suffix
            with open(path, "wb") as f:
                f.write(data)
            return path
        return make

    cases = [(f"weights_{n}", folder_with(weights_data=d)) for n, d in byte_mutations(w_bytes, rng, 40, 8, 6)]
    cases += [(f"config_{n}", folder_with(config_data=d)) for n, d in byte_mutations(c_bytes, rng, 20, 4, 3)]
    cases += [(f"weights_{n}", folder_with(weights_data=d)) for n, d in text_files()]
    cases += [(f"config_{n}", folder_with(config_data=d)) for n, d in text_files()]
    cases += [(f"file_{n}", single_file(d, ".pt")) for n, d in text_files()]
    cases += [(f"safetensors_{n}", single_file(d, ".safetensors")) for n, d in text_files()]
    # the old single-file format, which load_adapter still reads
    ad = load_adapter(tiny_adapter)
    # format 1 kept (in, r) and (r, out) tensors named M.lora_a and M.lora_b
    old = {f"{k[:-len('.lora_A')]}.lora_{'a' if k.endswith('A') else 'b'}": v.T.contiguous()
           for k, v in ad.tensors.items()}
    legacy = {"version": 1, "kind": "lora", "lora": old, "r": ad.r, "alpha": ad.alpha,
              "targets": ad.targets, "base_fingerprint": ad.base_fingerprint}
    save_checkpoint(legacy, str(tmp_path / "legacy.pt"))
    l_bytes = open(tmp_path / "legacy.pt", "rb").read()
    cases += [(f"legacy_{n}", single_file(d, ".pt")) for n, d in byte_mutations(l_bytes, rng, 20, 4, 3)]
    cases += [(f"legacy_{n}", single_file(d, ".pt")) for n, d in code_pickles(str(tmp_path), "lora")]
    # valid files, wrong contents
    from safetensors.torch import save as st_save
    k = next(iter(old))
    wrong = [
        {"lora": {}}, {"lora": {k: "x"}}, {"lora": old, "r": "2"},
        {"lora": {**old, k: old[k][:, :1]}}, {"targets": "Wq"},
        {"lora": {**old, k: torch.full_like(old[k], float("nan"))}},
        {"r": 2.7}, {"alpha": 1e308}, {"style": "comic"}, {"lora": {**old, k: old[k][None]}},
    ]
    for i, change in enumerate(wrong):
        buf = io.BytesIO()
        torch.save({**legacy, **change}, buf)
        cases.append((f"legacy_wrong{i}", single_file(buf.getvalue(), ".pt")))
    tensors_wrong = [
        {"a": torch.zeros(2)},
        {"base_model.model.x.lora_A.weight": torch.zeros(2, 4)},
        {"base_model.model.x.lora_A.weight": torch.zeros(2, 4), "base_model.model.x.lora_B.weight": torch.zeros(3, 3)},
        {"base_model.model.x.lora_A.weight": torch.zeros(2, 4, dtype=torch.int32),
         "base_model.model.x.lora_B.weight": torch.zeros(4, 2, dtype=torch.int32)},
    ]
    for i, t in enumerate(tensors_wrong):
        cases.append((f"safetensors_wrong{i}", folder_with(weights_data=st_save(t))))
    cfg = json.loads(c_bytes)
    for i, change in enumerate([{"r": 3}, {"r": "two"}, {"lora_alpha": -1}, {"peft_type": "IA3"}, {"use_dora": True}]
                               + [{k: v} for k, v, _ in HEADER_CASES if k in cfg]):
        cases.append((f"config_wrong{i}", folder_with(config_data=json.dumps({**cfg, **change}).encode())))
    for i, (key, value, _) in enumerate(c for c in HEADER_CASES if c[0].startswith("mnist_sd.")):
        cases.append((f"header_wrong{i}", folder_with(weights_data=with_metadata(weights, {key: value}))))
    return cases


# fields of adapter_config.json and of the tensors' header, each out of its range, with what the message says
HEADER_CASES = [
    ("lora_dropout", "abc", "lora_dropout = 'abc' must be a number in [0, 1)"),
    ("lora_dropout", [1], "lora_dropout = [1] must be a number in [0, 1)"),
    ("lora_dropout", 1.0, "must be a number in [0, 1)"),
    ("r", 2.7, "field r = 2.7 must be a whole number from 1 to 4096"),
    ("r", True, "field r = True must be a whole number"),
    ("r", 10 ** 6, "must be a whole number from 1 to 4096"),
    ("lora_alpha", 1e308, "lora_alpha = 1e+308 must be a positive number with lora_alpha / r at most 1000"),
    ("lora_alpha", "2", None),  # a number as a string: PEFT's own JSON never has one, but it is a number
    ("target_modules", [1, 2], "target_modules = [1, 2] must be a list of module names"),
    ("base_model_name_or_path", 5, "base_model_name_or_path = 5 must be a string"),
    ("mnist_sd.style", "comic", "mnist_sd.style = 'comic' must be none, italic, bold, font:NAME or data:NAME"),
    ("mnist_sd.r", "2.7", "mnist_sd.r = '2.7' must be a whole number"),
    ("mnist_sd.lora_alpha", "1e308", "mnist_sd.lora_alpha = '1e308' must be a positive number"),
]


def with_metadata(weights, changes):
    """The safetensors file's bytes with header fields changed (the tensors, and so their hash, untouched)."""
    from safetensors import safe_open
    from safetensors.torch import save as st_save

    with safe_open(weights, "pt") as f:
        meta = {**f.metadata(), **changes}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return st_save(tensors, metadata=meta)


@pytest.mark.parametrize("key,value,message", HEADER_CASES, ids=[f"{k}={v!r}" for k, v, _ in HEADER_CASES])
def test_adapter_header_fields_are_range_checked(tiny_adapter, tmp_path, key, value, message):
    """Every field read from adapter_config.json or the tensors' header is checked before use: one line naming the
    file, the field and the fix, never a traceback, never a value quietly rounded (r 2.7 loaded as 2)."""
    from lora import LoraError

    dest = tmp_path / "lora"
    shutil.copytree(tiny_adapter, dest)
    if key.startswith("mnist_sd."):
        data = with_metadata(os.path.join(tiny_adapter, "adapter_model.safetensors"), {key: value})
        (dest / "adapter_model.safetensors").write_bytes(data)
    else:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    if message is None:
        assert load_adapter(str(dest)).alpha == 2.0
        return
    with pytest.raises(LoraError) as e:
        load_adapter(str(dest))
    text = str(e.value)
    assert message in text and str(dest) in text and "correct the field or re-create" in text and "\n" not in text


@pytest.mark.parametrize("argv", [["denoise", "--lora", "{a}:1e308"], ["denoise", "--lora", "{a}:-11"],
                                  ["lora_tools", "grid", "{a}", "{a}", "--weights", "0,1e308"],
                                  ["lora_tools", "grid", "{a}", "{a}", "--weights", "0,nan"],
                                  ["lora_tools", "merge", "{a}:20", "{a}", "--out", "{out}"]])
def test_adapter_weights_out_of_range_exit_2(tiny_adapter, tiny_ckpt, tmp_path, capsys, argv):
    """PATH:WEIGHT and grid --weights: finite and within config.WEIGHT_RANGE, checked before any file is read."""
    import denoise
    import lora_tools

    main = {"denoise": denoise.main, "lora_tools": lora_tools.main}[argv[0]]
    args = [a.format(a=tiny_adapter, out=tmp_path / "merged") for a in argv[1:]]
    if argv[0] == "denoise":
        args += ["--ckpt", tiny_ckpt, "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "from -10 to 10" in err or "finite number" in err
    # named as the user wrote it: lora_tools takes its adapters as positional arguments, not --lora
    assert ("--lora" in err) == (argv[0] == "denoise")
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_fuzzed_adapters_are_refused_or_load_intact(tiny_adapter, tmp_path):
    rng = random.Random(1)
    good = load_adapter(tiny_adapter)
    cases = adapter_cases(tiny_adapter, tmp_path, rng)
    outcomes = Outcomes()

    def same(ad):
        weights = (tensors_equal(ad.tensors, good.tensors) and ad.r == good.r and ad.alpha == good.alpha
                   and sorted(ad.targets) == sorted(good.targets))
        if weights and ad.base_fingerprint != good.base_fingerprint:
            # the header's base fingerprint is outside the tensors' hash: applying it is then refused as
            # "trained on another base", which protects the weights but names the wrong cause
            return "weights intact, fingerprint damaged"
        return weights
    for i, (name, make) in enumerate(cases):
        path = make(str(tmp_path / f"case{i}"))
        outcomes.check(name, lambda: load_adapter(path), same)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    assert len(cases) >= 100
    assert not os.path.exists(tmp_path / MARKER), "a pickle ran code"
    assert not outcomes.problems, outcomes.problems[:10]
    print(f"adapters: {len(cases)} files, {dict(outcomes.counts)}")


def test_fuzzed_training_states_are_refused(tiny_adapter, tmp_path):
    """--resume reads training_state.pt beside the adapter: damaged or hostile ones are refused too."""
    state = open(os.path.join(tiny_adapter, "training_state.pt"), "rb").read()
    rng = random.Random(2)
    cases = byte_mutations(state, rng, 20, 4, 3) + code_pickles(str(tmp_path), "lora_state")
    good = torch.load(os.path.join(tiny_adapter, "training_state.pt"), weights_only=True)
    outcomes = Outcomes()
    for i, (name, data) in enumerate(cases):
        dest = tmp_path / f"case{i}"
        shutil.copytree(tiny_adapter, dest)
        (dest / "training_state.pt").write_bytes(data)
        outcomes.check(name, lambda: load_training_state(str(dest)),
                       lambda s: tensors_equal(s.tensors, good["lora"]) and s.step == good["step"])
        shutil.rmtree(dest)
    assert not os.path.exists(tmp_path / MARKER), "a pickle ran code"
    assert not outcomes.problems, outcomes.problems[:10]


# ================================================================== own style data: lora_finetune.py --data
# Each bad folder, image, .npz or font name is one StyleDataError naming the file (or font) and the fix;
# through lora_finetune.py it is one `error:` line, exit code 2, and nothing written: no adapter folder, no
# preview. The data is read and checked before any model is built.

import numpy as np  # noqa: E402  (this block's own imports: it stands apart from the checkpoint fuzzing above)
from PIL import Image, ImageDraw  # noqa: E402

import styles  # noqa: E402
import style_training  # noqa: E402


def _digit_page(size=(60, 80), ink=0, paper=255):
    img = Image.new("L", size, paper)
    ImageDraw.Draw(img).ellipse((15, 15, size[0] - 15, size[1] - 15), outline=ink, width=6)
    return img


def _png_bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _folder(root, files):
    """root/<relative path> for each (path, bytes); a path ending in / is an empty folder."""
    os.makedirs(root, exist_ok=True)
    for rel, data in files.items():
        p = os.path.join(root, rel)
        if rel.endswith("/"):
            os.makedirs(p, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return root


def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def bad_style_data(tmp):
    """(case, spec, what the message must say): every bad input the --data and font paths refuse."""
    good = _png_bytes(_digit_page())
    two_frames = io.BytesIO()
    _digit_page().save(two_frames, format="GIF", save_all=True, append_images=[_digit_page(ink=80)])
    corrupt = bytearray(good)
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 4:idat + 20] = bytes(16)  # the compressed pixels zeroed: a zlib stream no more
    ok = np.zeros((4, 28, 28), np.uint8)
    ok[:, 8:20, 12:16] = 255
    labels = np.array([1, 2, 3, 4])
    j = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    return [
        ("empty folder", _folder(j("empty"), {}), "holds no images"),
        ("empty subfolders", _folder(j("hollow"), {"7/": b""}), "holds no images"),
        ("subfolders not digits", _folder(j("named"), {"seven/a.png": good, "10/b.png": good}), "'10', 'seven'"),
        ("a loose file", _folder(j("loose"), {"a.png": good, "7/b.png": good}), "outside the 0..9 subfolders"),
        ("a folder in a label", _folder(j("nested"), {"7/more/a.png": good}), "is a folder"),
        ("not an image", _folder(j("text"), {"3/notes.png": b"my digits, scanned on Monday\n"}), "notes.png"),
        ("truncated", _folder(j("cut"), {"3/half.png": good[:len(good) // 2]}), "half.png"),
        ("corrupt", _folder(j("corrupt"), {"3/bad.png": bytes(corrupt)}), "bad.png"),
        ("0 bytes", _folder(j("zero"), {"3/zero.png": b""}), "zero.png' is empty (0 bytes)"),
        ("animated GIF", _folder(j("anim"), {"3/anim.gif": two_frames.getvalue()}), "anim.gif' has 2 frames"),
        ("blank", _folder(j("blank"), {"3/white.png": _png_bytes(Image.new("L", (50, 50), 255))}),
         "white.png' has no ink"),
        ("blank RGBA", _folder(j("clear"), {"3/clear.png": _png_bytes(Image.new("RGBA", (50, 50), (0, 0, 0, 0)))}),
         "clear.png' has no ink"),
        ("npz wrong keys", _npz(j("keys.npz"), x=ok, y=labels), "lacks ['images', 'labels']"),
        ("npz images float", _npz(j("float.npz"), images=ok.astype(np.float32), labels=labels), "dtype float32"),
        ("npz images 32x32", _npz(j("big.npz"), images=np.zeros((4, 32, 32), np.uint8), labels=labels),
         "shape (4, 32, 32)"),
        ("npz images 2-D", _npz(j("flat.npz"), images=ok[0], labels=labels), "shape (28, 28)"),
        ("npz no images", _npz(j("none.npz"), images=ok[:0], labels=labels[:0]), "holds no images"),
        ("npz labels 10", _npz(j("ten.npz"), images=ok, labels=np.array([1, 2, 10, 4])), "found 1..10"),
        ("npz labels -1", _npz(j("neg.npz"), images=ok, labels=np.array([-1, 2, 3, 4])), "found -1..4"),
        ("npz labels float", _npz(j("flab.npz"), images=ok, labels=labels.astype(float)), "dtype float64"),
        ("npz labels short", _npz(j("short.npz"), images=ok, labels=labels[:3]), "labels have shape (3,)"),
        ("npz pickled", _npz(j("pickled.npz"), images=np.array([object()] * 4), labels=labels), "pickled.npz"),
        ("npz blank image", _npz(j("blank.npz"), images=np.concatenate([ok[:3], ok[:1] * 0]), labels=labels),
         "image 3 (label 4) has no ink"),
        ("npz not a zip", _folder(j("junk"), {"junk.npz": b"PK\x03\x04 not really"}) + "/junk.npz",
         "not a readable .npz"),
        ("a file of another kind", _folder(j("other"), {"digits.txt": b"1 2 3"}) + "/digits.txt", "not an .npz"),
        ("missing", j("nowhere"), "not found"),
        ("unknown font", "font:Helvetica Neue", "choose one of: cmb10"),
    ]


def test_bad_style_data_is_one_error_naming_the_file(tmp_path):
    for case, spec, says in bad_style_data(str(tmp_path)):
        with pytest.raises(styles.StyleDataError) as e:
            style_training.load_style_data(spec, log=None)
        message = str(e.value)
        assert says in message and "\n" not in message, (case, message)
        named = os.path.basename(spec) if not spec.startswith("font:") else "Helvetica Neue"
        assert named in message, (case, message)


@pytest.mark.parametrize("pixels", [1600, 2500])  # over Pillow's limit: its warning (up to 2x) and its error
def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    side = int(pixels ** 0.5)
    folder = _folder(str(tmp_path / "d"), {"1/huge.png": _png_bytes(_digit_page((side, side)))})
    with pytest.raises(styles.StyleDataError, match="huge.png' has more pixels than Pillow's decompression-bomb "
                                                    "limit"):
        style_training.load_style_data(folder, log=None)


def test_bad_style_data_stops_lora_finetune_before_anything_is_written(tiny_ckpt, tmp_path, capsys):
    import lora_finetune

    for i, (case, spec, says) in enumerate(bad_style_data(str(tmp_path / "in"))):
        out = tmp_path / f"out{i}" / "lora"
        flag = ["--style", spec] if spec.startswith("font:") else ["--data", spec]
        with pytest.raises(SystemExit) as e:
            lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--ckpt", tiny_ckpt, "--out", str(out), *flag])
        err = capsys.readouterr().err
        assert e.value.code == 2, case
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, (case, err)
        assert not os.path.exists(out.parent), case  # no adapter folder, no preview, nothing


def test_fuzzed_images_are_refused_or_load(tmp_path):
    """Byte flips, truncations and junk in a PNG and a JPEG: each loads as one digit or is one StyleDataError."""
    rng = random.Random(3)
    cases = []
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif")):
        data = _png_bytes(_digit_page(), fmt)
        cases += [(f"{ext}-{name}", ext, d) for name, d in byte_mutations(data, rng, 25, 6, 3)]
    counts = collections.Counter()
    for i, (name, ext, data) in enumerate(cases):
        folder = _folder(str(tmp_path / f"case{i}"), {f"5/digit.{ext}": data})
        try:
            got = style_training.load_style_data(folder, log=None)
        except styles.StyleDataError as e:
            assert "digit." in str(e) and "\n" not in str(e), (name, str(e))
            counts["refused"] += 1
        else:
            assert got.images.shape == (1, 28, 28) and got.labels.tolist() == [5], name
            counts["loaded"] += 1
        shutil.rmtree(folder)
    assert counts["refused"] >= 10, counts


# ------------------------------------------------------------------ output paths: every spelling of an input
# A writer compares its outputs with its inputs resolved (files.check_apart): a symlink, a chain of them, a
# symlink to a parent, "x/../", "./", "//", an absolute or a relative path, and an adapter folder against a
# file inside it must all be seen as the same thing; neighbours must not.

def _spellings(rng, target, folder_target):
    """A random way of writing ``target`` (a path relative to the case folder, which is the working directory)."""
    parts = target.split("/")
    if parts[0] == "ad":
        parts[0] = rng.choice(["ad", "l1", "l2", "sub/../ad", "sub/up/ad", "./ad", "ad/../ad", "l1/../ad"])
    path = "/".join(parts)
    path = rng.choice(["", "./", "sub/../", "sub/up/", os.getcwd() + "/"]) + path
    if rng.random() < 0.3:
        path = path.replace("/", "//", 1)
    if folder_target and rng.random() < 0.3:
        path += "/"
    return path


def test_every_spelling_of_an_input_is_refused_as_an_output(tmp_path, monkeypatch):
    from files import WriteError, check_apart, same_thing

    monkeypatch.chdir(tmp_path)
    for name in ("ad", "ad2", "sub"):
        os.mkdir(name)
    for name in ("ad", "ad2"):
        open(f"{name}/adapter_model.safetensors", "wb").close()
        open(f"{name}/adapter_config.json", "w").write("{}")
    open("ck.pt", "wb").close()
    open("ck2.pt", "wb").close()
    os.symlink("ad", "l1")
    os.symlink("l1", "l2")  # a chain
    os.symlink("..", "sub/up")  # a way back up
    rng = random.Random(7)
    # (input, output): the same thing, or an adapter folder and a file in it, either way round
    same = [("ad", "ad"), ("ck.pt", "ck.pt"), ("ad", "ad/adapter_model.safetensors"),
            ("ad/adapter_config.json", "ad"), ("ad/training_state.pt", "ad/adapter_model.safetensors"),
            ("ad", "ad/grid.png")]
    apart = [("ad", "ad2"), ("ck.pt", "ck2.pt"), ("ad/adapter_model.safetensors", "ad2/adapter_model.safetensors"),
             ("ck.pt", "ck.pt.png"), ("ad", "ad.safetensors")]
    refused = 0
    for _ in range(300):
        given, out = rng.choice(same)
        a = _spellings(rng, given, "." not in given)
        b = _spellings(rng, out, "." not in out)
        with pytest.raises(WriteError, match="a run never writes over a file it reads"):
            check_apart([("--out", b)], [("SRC", a)], "pass another --out")
        if out != "ad/grid.png":
            assert same_thing(a, b), (a, b)
        refused += 1
    for _ in range(200):
        given, out = rng.choice(apart)
        a, b = _spellings(rng, given, "." not in given), _spellings(rng, out, "." not in out)
        check_apart([("--out", b)], [("SRC", a)], "pass another --out")
        assert not same_thing(a, b), (a, b)
    assert refused == 300
