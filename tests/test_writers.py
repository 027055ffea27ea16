"""No writer takes its own input as output, and what a killed run leaves behind is removed by the next.

Every script and subcommand that writes is given, as its output, each of its inputs: the same path,
a symlink to it, the ``a/../a`` spelling, and an adapter folder against a file inside it. Each must
stop with exit code 2 and one ``error: ...`` line before any work, and every input must be byte for
byte what it was. An output that already holds a result of ours needs --overwrite; one that holds a
file of another kind is never replaced. The temporary files and folders of the atomic writes carry
one name pattern (``.NAME.PID-XXXXXXXX.sd-tmp``), and only stale ones of that pattern are removed.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import bench
import denoise
import evaluate
import lora_finetune
import lora_tools
import train
from test_interrupt import (Ctrl_C, _one_thread, assert_same_state, inside_forward, reference_train,  # noqa: F401
                            small_data, train_argv)
from files import (TEMP_SUFFIX, WriteError, atomic_write, check_apart, check_replace, file_kind, is_temp_name,
                   remove_stale_temps, temp_folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32"]


def tree_hash(folder):
    """{relative path: sha256} of every file under ``folder`` (symlinks as their target's text), to show nothing
    changed."""
    out = {}
    for dirpath, dirnames, names in os.walk(folder):
        for n in names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def refused(main, argv, capsys):
    """exit code 2, no traceback, and one ``error: ...`` line, the last on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum("error:" in line for line in lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module")
def d(tmp_path_factory, tiny_ckpt, tiny_adapter):
    """A case folder: ckpt.pt, adapters ad/ and ad2/, a kohya file, a symlink to ad/, a checkpoint saved under a
    name denoise writes (samples.npz), samples saved under a name evaluate writes, a JSON and a text file."""
    d = tmp_path_factory.mktemp("writers")
    shutil.copy(tiny_ckpt, d / "ckpt.pt")
    shutil.copy(tiny_ckpt, d / "samples.npz")  # a checkpoint that happens to carry an output's name
    shutil.copytree(tiny_adapter, d / "ad")
    shutil.copytree(tiny_adapter, d / "ad2")
    os.symlink("ad", d / "link")
    lora_tools.main(["convert", str(d / "ad"), "--out", str(d / "k.safetensors"), "--ckpt", str(d / "ckpt.pt")])
    with open(d / "report.png", "wb") as f:  # samples under the name of evaluate's report
        np.savez(f, images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(10))
    (d / "other.json").write_text('{"mine": 1}\n')
    (d / "notes.txt").write_text("my notes\n")
    (d / "notes.png").write_text("not a picture\n")
    os.mkdir(d / "run")
    shutil.copy(tiny_ckpt, d / "run" / "config.json")  # a checkpoint named like train.py's config.json
    return d


def cases(d):
    """(script, argv, what the line must say): every writer with one of its inputs as its output."""
    ck, ad, ad2, k = d / "ckpt.pt", d / "ad", d / "ad2", d / "k.safetensors"
    tools = lora_tools.main
    return [
        # lora_tools: each subcommand, its inputs as --out
        (tools, ["grid", ad2, ad2, "--ckpt", ck, "--out", ck], "is --ckpt"),
        (tools, ["grid", ad, ad2, "--ckpt", ck, "--out", ad / "adapter_model.safetensors"], "is PATH"),
        (tools, ["grid", ad, ad2, "--ckpt", ck, "--out", ad / "grid.png"], "is inside PATH"),
        (tools, ["merge", ad, ad2, "--ckpt", ck, "--out", ad], "is PATH"),
        (tools, ["merge", f"{ad}:0.5", ad2, "--ckpt", ck, "--out", d / "link", "--overwrite"], "is PATH"),
        (tools, ["merge", k, ad2, "--ckpt", ck, "--out", k], "is PATH"),
        (tools, ["resize", ad, "--rank", "1", "--ckpt", ck, "--out", ad], "is SRC"),
        (tools, ["resize", ad / "adapter_model.safetensors", "--rank", "1", "--ckpt", ck, "--out", ad], "is SRC"),
        (tools, ["convert", ad, d / "link", "--ckpt", ck], "is SRC"),  # a symlink to the source
        (tools, ["convert", ad, "--out", d / "ad" / ".." / "ad", "--ckpt", ck], "is SRC"),  # a/../a
        (tools, ["convert", k, "--out", k, "--ckpt", ck], "is SRC"),
        (tools, ["convert", ad / "adapter_config.json", "--out", ad, "--ckpt", ck], "is SRC"),
        (tools, ["extract", "--tuned", ck, "--base", ck, "--out", ck], "is --tuned"),
        (tools, ["extract", "--tuned", d / "samples.npz", "--base", ck, "--out", d / "samples.npz"], "is --tuned"),
        # an output that holds a result of ours needs --overwrite; one of another kind is never replaced
        (tools, ["convert", ad, "--out", ad2, "--ckpt", ck], "pass --overwrite"),
        (tools, ["resize", ad, "--rank", "1", "--ckpt", ck, "--out", d / "link2.safetensors"], None),
        (tools, ["grid", ad, ad2, "--ckpt", ck, "--out", d / "notes.png", "--overwrite"], "left as it is"),
        (tools, ["convert", ad, "--out", d / "run", "--ckpt", ck, "--overwrite"], "left as it is"),
        # denoise: its --ckpt and --lora as outputs
        (denoise.main, ["--ckpt", d / "samples.npz", "--out-dir", d], "is --ckpt"),
        (denoise.main, ["--ckpt", ck, "--lora", ad, "--out-dir", ad], "is inside --lora"),
        (denoise.main, ["--ckpt", ck, "--lora", d / "link", "--out-dir", d / "ad" / ".." / "ad"], "is inside --lora"),
        (denoise.main, ["--ckpt", ck, "--out-dir", d, "--name", "notes"], "left as it is"),
        # lora_finetune: --out onto its --ckpt, its --resume, or another adapter
        (lora_finetune.main, [*TINY, "--ckpt", d / "ad" / ".." / "ckpt.pt", "--full", "--out", ck], "is --ckpt"),
        (lora_finetune.main, [*TINY, "--ckpt", ck, "--out", d], "holds --ckpt"),
        (lora_finetune.main, [*TINY, "--ckpt", ck, "--out", ad], "pass --overwrite"),
        (lora_finetune.main, [*TINY, "--ckpt", ck, "--out", d / "link"], "pass --overwrite"),
        (lora_finetune.main, [*TINY, "--ckpt", ck, "--resume", ad, "--out", ad2], "pass --overwrite"),
        (lora_finetune.main, [*TINY, "--ckpt", ck, "--full", "--out", d / "samples.npz"], "pass --overwrite"),
        (lora_finetune.main, [*TINY, "--ckpt", ck, "--full", "--out", d / "notes.txt", "--overwrite"],
         "other than a base checkpoint"),
        # train: its --resume as one of the files it writes
        (train.main, [*TINY, "--resume", d / "run" / "config.json", "--out-dir", d / "run"], "is --resume"),
        (train.main, [*TINY, "--resume", d / "samples.npz", "--out-dir", d], "another run's checkpoint"),
        # evaluate: a report, or the classifier cache, onto a file it reads
        (evaluate.main, ["--samples", d / "report.png", "--out-dir", d, "--name", "report"], "is --samples"),
        (evaluate.main, ["--ckpt", ck, "--lora", ad, "--out-dir", ad], "is inside --lora"),
        (evaluate.main, ["--ckpt", ck, "--classifier", d / "link" / ".." / "ckpt.pt", "--out-dir", d / "ev"],
         "is --ckpt"),
        (evaluate.main, ["--ckpt", ck, "--lora", ad, "--classifier", ad / "adapter_model.safetensors",
                         "--out-dir", d / "ev"], "is --lora"),
        # bench: --out onto a folder, a checkpoint, a JSON it did not write
        (bench.main, ["--preset", "tiny", "--out", d], "is a folder"),
        (bench.main, ["--preset", "tiny", "--out", ck, "--overwrite"], "left as it is"),
        (bench.main, ["--preset", "tiny", "--out", d / "other.json", "--overwrite"], "left as it is"),
    ]


def test_every_writer_refuses_each_of_its_inputs_as_output(d, tmp_path, capsys, monkeypatch):
    # the long work of each script fails the test if it is ever reached
    monkeypatch.setattr(lora_finetune, "fit", lambda *a, **k: pytest.fail("fine-tune started"))
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(denoise, "generate", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.setattr(evaluate, "load_dataset", lambda *a, **k: pytest.fail("evaluation started"))
    monkeypatch.setattr(bench, "load_dataset", lambda *a, **k: pytest.fail("benchmark started"))
    monkeypatch.chdir(tmp_path)  # a default path (data/, out/) would land here, where the test looks
    (d / "link2.safetensors").symlink_to("k.safetensors")
    before = tree_hash(d)
    try:
        for main, argv, message in cases(d):
            line = refused(main, argv, capsys)
            assert message is None or message in line, (argv, line)
            assert tree_hash(d) == before, argv  # every input byte for byte as it was
    finally:
        os.remove(d / "link2.safetensors")
    assert os.listdir(tmp_path) == []  # and nothing was written anywhere else


def test_an_adapter_written_over_needs_overwrite_and_the_checks_see_symlinks(d, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert", str(d / "ad"), "--out", str(out), "--ckpt", str(d / "ckpt.pt")]
    lora_tools.main(args)
    first = tree_hash(out)
    line = refused(lora_tools.main, args, capsys)
    assert "already holds an adapter; pass --overwrite" in line and tree_hash(out) == first
    lora_tools.main(args + ["--overwrite"])
    again = tree_hash(out)
    # the same adapter again, written over on purpose; its model card names the command, --overwrite now included
    assert {k: v for k, v in again.items() if k != "README.md"} == {k: v for k, v in first.items() if k != "README.md"}
    assert "--overwrite`" in (out / "README.md").read_text()
    assert not [n for n in os.listdir(tmp_path) if is_temp_name(n)]


def test_evaluate_checks_its_samples_before_the_data_set_is_touched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(evaluate.main, ["--samples", "nope.npz"], capsys)
    assert "'nope.npz' not found" in line
    assert os.listdir(tmp_path) == []  # no data/MNIST/raw, no out/eval


def test_bench_refuses_its_out_before_any_timing(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps({"version": 1, "machine": {}, "table": ""}))
    before = tree_hash(tmp_path)
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "bench.json", "pass --overwrite"),
                         (tmp_path / "a" / "ckpt.pt", None)):
        if message is None:  # a checkpoint there: left alone, with or without --overwrite
            (tmp_path / "a").mkdir()
            shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "a" / "ckpt.pt")
            before = tree_hash(tmp_path)
            message = "left as it is"
        start = time.perf_counter()
        line = refused(bench.main, ["--preset", "tiny", "--repeats", "1", "--device", "cpu", "--out", out,
                                    "--overwrite" if "left" in message else "--seed=0"], capsys)
        assert message in line and time.perf_counter() - start < 5
        assert tree_hash(tmp_path) == before


@pytest.mark.slow
def test_bench_fails_fast_in_a_real_process(tmp_path):
    """The whole process, imports included, refuses a folder as --out within seconds and writes nothing."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--preset", "tiny", "--repeats", "1",
                           "--device", "cpu", "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --out")
    assert time.perf_counter() - start < 60 and os.listdir(tmp_path) == []


# ------------------------------------------------------------------ the helpers themselves

def test_check_apart_resolves_paths_and_treats_an_adapter_folder_as_one(d, tmp_path):
    ad = str(d / "ad")
    for out in (ad, str(d / "link"), f"{d}/ad/../ad", f"{ad}/adapter_model.safetensors", f"{ad}/new.png",
                f"{d}/link/adapter_config.json"):
        with pytest.raises(WriteError, match="a run never writes over a file it reads"):
            check_apart([("--out", out)], [("SRC", ad)], "pass another --out")
        with pytest.raises(WriteError):
            check_apart([("--out", out)], [("SRC", f"{ad}/training_state.pt")], "pass another --out")
    with pytest.raises(WriteError, match="holds SRC"):  # an output folder holding an input
        check_apart([("--out", str(d))], [("SRC", str(d / "ckpt.pt"))], "x")
    check_apart([("--out", str(d / "ad2"))], [("SRC", ad), ("--ckpt", None)], "x")  # neighbours are apart
    check_apart([("--out", str(d / "ckpt.png"))], [("--ckpt", str(d / "ckpt.pt"))], "x")


def test_file_kinds_and_what_is_never_replaced(d, tmp_path):
    assert [file_kind(d / n) for n in ("ckpt.pt", "samples.npz", "ad", "k.safetensors", "other.json", "notes.txt",
                                       "nope")] == ["checkpoint", "checkpoint", "adapter folder", "safetensors",
                                                    "json", "other", "missing"]
    assert file_kind(d / "report.png") == "npz"  # by its bytes, not its name
    (tmp_path / "empty").mkdir()
    check_replace(tmp_path / "empty", "--out", ("adapter folder",), False, "an adapter")  # empty: free
    with pytest.raises(WriteError, match="pass --overwrite"):
        check_replace(d / "ad", "--out", ("adapter folder",), False, "an adapter")
    check_replace(d / "ad", "--out", ("adapter folder",), True, "an adapter")
    with pytest.raises(WriteError, match="left as it is"):
        check_replace(d / "notes.txt", "--out", ("png",), True, "a picture")


# ------------------------------------------------------------------ temporaries

def dead_pid():
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_temps(folder, pid, names, age=3600):
    """Temporaries as a run killed ``age`` seconds ago leaves them: files, and (name ending in /) folders."""
    made = []
    for name in names:
        p = os.path.join(folder, f".{name.rstrip('/')}.{pid}-abcd1234{TEMP_SUFFIX}")
        if name.endswith("/"):
            os.makedirs(p)
            with open(os.path.join(p, "adapter_model.safetensors"), "wb") as f:
                f.write(b"partial")
        else:
            with open(p, "wb") as f:
                f.write(b"PK\x03\x04 partial")
        os.utime(p, (time.time() - age, time.time() - age))
        made.append(p)
    return made


def test_temporaries_carry_one_pattern_and_only_stale_ones_are_removed(tmp_path, capsys):
    seen = []

    def write(tmp):
        seen.append(os.path.basename(tmp))
        open(tmp, "w").write("{}")
    atomic_write(str(tmp_path / "config.json"), write)
    folder = temp_folder(str(tmp_path / "lora"))
    assert is_temp_name(seen[0]) and seen[0].startswith(f".config.json.{os.getpid()}-") and is_temp_name(
        os.path.basename(folder))
    os.rmdir(folder)
    stale = plant_temps(str(tmp_path), dead_pid(), ["ckpt.pt", "config.json", "lora/"])
    alive = plant_temps(str(tmp_path), os.getppid(), ["ckpt.pt"], age=0)  # a live process may still be writing it
    # a dead process's temporary is stale however new it is (kill -9, then the rerun within the same second)
    fresh = plant_temps(str(tmp_path), dead_pid(), ["loss.csv"], age=-60)
    # a PID used again: the process that has it now started after the file was last changed (before boot)
    with open("/proc/uptime") as f:
        reused = plant_temps(str(tmp_path), os.getppid(), ["samples.png"], age=float(f.read().split()[0]) + 60)
    foreign = [tmp_path / ".ckpt.ptab12.tmp", tmp_path / "notes.sd-tmp", tmp_path / ".x.12-ab.sd-tmp.bak"]
    for p in foreign:
        p.write_text("not ours")
    assert remove_stale_temps(str(tmp_path)) == 5
    assert "removed 5 temporary files left by an interrupted run" in capsys.readouterr().out
    assert not any(os.path.exists(p) for p in stale + fresh + reused)
    assert all(os.path.exists(p) for p in alive + foreign)
    assert remove_stale_temps(str(tmp_path)) == 0 and capsys.readouterr().out == ""


def test_a_kill_leaves_temporaries_the_next_run_removes_and_resumes_exactly(small_data, tmp_path_factory, tmp_path,
                                                                            monkeypatch, capsys):
    """A run stopped at once after its step-4 checkpoint, with what kill -9 during its step-6 save leaves (a
    checkpoint's, config.json's and a grid's temporaries) and no config.json: the next run says it removes
    them, needs no config.json to resume, and ends where an uninterrupted run ends, tensor for tensor."""
    import torch

    straight = reference_train(tmp_path_factory)
    hit = Ctrl_C(5, times=2)  # the second Ctrl-C inside step 5's forward stops without saving
    with monkeypatch.context() as mp:
        inside_forward(mp, hit)
        with pytest.raises(SystemExit):
            train.main(train_argv(tmp_path))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    os.remove(tmp_path / "config.json")
    pid = dead_pid()
    stale = plant_temps(str(tmp_path), pid, ["ckpt.pt", "config.json"]) + plant_temps(
        str(tmp_path / "samples"), pid, ["epoch_0003.png"])
    capsys.readouterr()
    train.main(train_argv(tmp_path, "--resume", str(tmp_path / "ckpt.pt")))
    out = capsys.readouterr().out
    assert f"removed 2 temporary files left by an interrupted run in {tmp_path}" in out
    assert f"removed 1 temporary file left by an interrupted run in {tmp_path / 'samples'}" in out
    assert not any(os.path.exists(p) for p in stale)
    assert not [n for _, _, names in os.walk(tmp_path) for n in names if is_temp_name(n)]
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 6
    assert assert_same_state(straight, resumed, ("model", "ema", "optimizer", "rng")) > 100
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_steps"] == 6  # written again


def test_a_killed_fine_tune_leaves_a_temporary_folder_the_next_run_removes(small_data, tmp_path, tiny_ckpt, capsys):
    from test_interrupt import lora_argv

    out = tmp_path / "lora"
    lora_finetune.main(lora_argv(tiny_ckpt, out, "--lora-steps", "2"))
    stale = plant_temps(str(tmp_path), dead_pid(), ["lora/"])  # write_adapter's folder, killed mid-save
    capsys.readouterr()
    lora_finetune.main(lora_argv(tiny_ckpt, out, "--resume", str(out), "--lora-steps", "4"))
    assert "removed 1 temporary file left by an interrupted run" in capsys.readouterr().out
    assert not os.path.exists(stale[0]) and sorted(os.listdir(tmp_path)) == ["lora"]


# a train.py run in its own process on 32 images (2 steps an epoch: checkpoints after steps 2, 4 and 6),
# killed with SIGKILL just before the KILL_AT-th os.replace onto KILL_NAME: the temporary file is then whole
# and in place, as kill -9 leaves it
DRIVER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import train, trainer
from dataset import Digits

real = trainer.load_dataset_distributed


def small(name, split, data_dir, dist_info, log=print):
    d = real(name, split, data_dir, dist_info, log)
    return Digits(d.images[:32], d.labels[:32], d.name, d.split, d.classes)


train.load_dataset_distributed = small
kill_name, kill_at, seen = os.environ.get("KILL_NAME"), int(os.environ.get("KILL_AT", "0")), [0]
replace = os.replace


def killing_replace(src, dst):
    if os.path.basename(dst) == kill_name:
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)


os.replace = killing_replace
train.main(sys.argv[2:])
"""


_straight = {}


def run_driver(tmp_path, out_dir, *extra, kill=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill:
        env.update(KILL_NAME=kill[0], KILL_AT=str(kill[1]))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run([sys.executable, str(driver), ROOT, *TINY, "--max-steps", "6", "--out-dir", str(out_dir),
                           *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [("ckpt.pt", 2), ("config.json", 1)], ids=["second checkpoint", "config.json"])
def test_kill_9_during_a_save_then_the_next_run_cleans_up_and_resumes_exactly(tmp_path_factory, tmp_path, kill):
    """A real SIGKILL: at the second checkpoint's rename (its temporary left, the step-2 checkpoint in place), or
    at config.json's (the first checkpoint written, config.json not: the checkpoint alone is enough to resume)."""
    import torch

    if "driver" not in _straight:  # the uninterrupted run, once for both cases
        folder = tmp_path_factory.mktemp("straight")
        straight = run_driver(folder, folder / "run")
        assert straight.returncode == 0, straight.stderr
        _straight["driver"] = torch.load(folder / "run" / "ckpt.pt", weights_only=True)
    run = tmp_path / "run"
    killed = run_driver(tmp_path, run, kill=kill)
    assert killed.returncode == -9, killed.stderr
    left = [n for n in os.listdir(run) if is_temp_name(n)]
    assert len(left) == 1 and left[0].startswith(f".{kill[0]}.")
    assert os.path.exists(run / "ckpt.pt") and (kill[0] != "config.json" or not os.path.exists(run / "config.json"))
    # no pause: the rerun starts at once, and the temporary is still known as the killed run's
    resumed = run_driver(tmp_path, run, "--resume", str(run / "ckpt.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed 1 temporary file left by an interrupted run in {run}" in resumed.stdout
    assert not [n for _, _, names in os.walk(run) for n in names if is_temp_name(n)]
    b = torch.load(run / "ckpt.pt", weights_only=True)
    assert b["step"] == 6 and assert_same_state(_straight["driver"], b, ("model", "ema", "optimizer", "rng")) > 100
    assert os.path.exists(run / "config.json")


def test_a_folder_holding_only_a_stopped_fine_tunes_logs_counts_as_its_adapter_folder(tmp_path):
    # a fine-tune stopped before its first save leaves its logs and nothing else: its rerun may replace them
    # with --overwrite, where a folder of anything else is never replaced
    from files import file_kind
    logs = tmp_path / "lora"
    (logs / "previews").mkdir(parents=True)
    (logs / "loss.csv").write_text("step,loss,lr,images_per_s\n1,0.5,0.01,100\n")
    assert file_kind(str(logs)) == "adapter folder"
    (logs / "notes.txt").write_text("mine")
    assert file_kind(str(logs)) == "folder"


def test_a_base_and_an_adapter_given_for_each_other_are_named_with_the_flag_that_fits(tiny_ckpt, tiny_adapter,
                                                                                      tmp_path, capsys):
    import denoise
    for argv, expected in (
            (["--ckpt", str(tiny_adapter)], "is a LoRA adapter folder, not a base checkpoint: pass it with --lora"),
            (["--ckpt", str(tiny_ckpt), "--lora", str(tiny_ckpt)],
             "is not a LoRA adapter: it is a base checkpoint (what --ckpt takes)")):
        with pytest.raises(SystemExit) as e:
            denoise.main([*argv, "--out-dir", str(tmp_path / "out"), "--steps", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and expected in err[0], err
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_run_folder_given_as_ckpt_names_the_checkpoint_inside(tiny_ckpt, tmp_path, capsys):
    """--ckpt out (the folder train.py wrote) is refused in one line that names out/ckpt.pt, the file it holds."""
    import denoise
    folder = os.path.dirname(str(tiny_ckpt))
    with pytest.raises(SystemExit) as e:
        denoise.main(["--ckpt", folder, "--out-dir", str(tmp_path / "out"), "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert f"is a folder, not a checkpoint file: pass {os.path.join(folder, 'ckpt.pt')!r}" in err[0], err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:  # a folder without one gets no such hint
        denoise.main(["--ckpt", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out"), "--steps", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a folder, not a checkpoint file" in err and "pass" not in err.split("file")[-1]
