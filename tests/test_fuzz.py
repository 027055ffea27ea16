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

from adapter import load_adapter, load_training_state
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
    legacy = {"version": 1, "kind": "lora", "lora": ad["lora"], "r": ad["r"], "alpha": ad["alpha"],
              "targets": ad["targets"], "base_fingerprint": ad["base_fingerprint"]}
    save_checkpoint(legacy, str(tmp_path / "legacy.pt"))
    l_bytes = open(tmp_path / "legacy.pt", "rb").read()
    cases += [(f"legacy_{n}", single_file(d, ".pt")) for n, d in byte_mutations(l_bytes, rng, 20, 4, 3)]
    cases += [(f"legacy_{n}", single_file(d, ".pt")) for n, d in code_pickles(str(tmp_path), "lora")]
    # valid files, wrong contents
    from safetensors.torch import save as st_save
    k = next(iter(ad["lora"]))
    wrong = [
        {"lora": {}}, {"lora": {k: "x"}}, {"lora": ad["lora"], "r": "2"},
        {"lora": {**ad["lora"], k: ad["lora"][k][:, :1]}}, {"targets": "Wq"},
        {"lora": {**ad["lora"], k: torch.full_like(ad["lora"][k], float("nan"))}},
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
    for i, change in enumerate([{"r": 3}, {"r": "two"}, {"lora_alpha": -1}, {"peft_type": "IA3"}, {"use_dora": True}]):
        cases.append((f"config_wrong{i}", folder_with(config_data=json.dumps({**cfg, **change}).encode())))
    return cases


def test_fuzzed_adapters_are_refused_or_load_intact(tiny_adapter, tmp_path):
    rng = random.Random(1)
    good = load_adapter(tiny_adapter)
    cases = adapter_cases(tiny_adapter, tmp_path, rng)
    outcomes = Outcomes()

    def same(ad):
        weights = (tensors_equal(ad["lora"], good["lora"]) and ad["r"] == good["r"] and ad["alpha"] == good["alpha"]
                   and sorted(ad["targets"]) == sorted(good["targets"]))
        if weights and ad["base_fingerprint"] != good["base_fingerprint"]:
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
                       lambda s: tensors_equal(s["lora"], good["lora"]) and s["step"] == good["step"])
        shutil.rmtree(dest)
    assert not os.path.exists(tmp_path / MARKER), "a pickle ran code"
    assert not outcomes.problems, outcomes.problems[:10]
