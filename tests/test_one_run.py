"""One run at a time on an output, and what a killed run leaves is cleared by the next, at once.

train.py and lora_finetune.py hold their output (an OS lock, fcntl.flock, on a lock file inside the
folder, or beside a --full checkpoint) for as long as they run: a second run on it stops with exit
code 2 and one line naming the first's PID and command, writing nothing. The lock dies with its
process, so a lock file a killed run left is taken over (and that is said), and a temporary file a
run killed with SIGKILL left is removed by a rerun started straight after, without waiting a second.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import lora_finetune
import train
from files import (LOCK_NAME, FolderInUse, WriteError, file_kind, is_temp_name, lock_output, lock_path,
                   release_locks)
from test_inputs import tree_hash
from test_writers import refused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32"]

# a process that takes an output's lock as the scripts do, says so, then holds it until its stdin closes, or
# starts a write and waits mid-way to be killed
HOLDER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from files import atomic_write, lock_output, temp_folder
target, flag, kind, then = sys.argv[2:6]
lock_output(target, flag, folder=kind == "folder")
if then == "hold":
    print("locked", flush=True)
    sys.stdin.read()
    sys.exit(0)


def half(tmp):  # a checkpoint half written when the kill comes
    with open(tmp, "wb") as f:
        f.write(b"PK\x03\x04" + bytes(1 << 20))
        f.flush()
        print("writing", flush=True)
        time.sleep(600)


if then == "write file":
    atomic_write(os.path.join(target, "ckpt.pt"), half)
else:  # an adapter's temporary folder beside it, as write_adapter makes it
    half(os.path.join(temp_folder(target), "adapter_model.safetensors"))
"""


def start_holder(tmp_path, target, flag="--out-dir", kind="folder", then="hold"):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), ROOT, str(target), flag, kind, then], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() in ("locked", "writing")
    return proc


@pytest.fixture
def case(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(lora_finetune, "fit", lambda *a, **k: pytest.fail("fine-tune started"))
    shutil.copy(tiny_ckpt, tmp_path / "ckpt.pt")
    (tmp_path / "run.toml").write_text("[train]\nlabel_drop = 0.2\n")
    return tmp_path


HELD = {  # what another process holds, and the command that then runs on it
    "train": ("out", "folder", "--out-dir", lambda d: (train.main, [*TINY, "--config", d / "run.toml", "--out-dir",
                                                                    d / "out"])),
    "fine-tune": ("lora", "folder", "--out", lambda d: (lora_finetune.main, [*TINY, "--ckpt", d / "ckpt.pt",
                                                                            "--config", d / "run.toml", "--out",
                                                                            d / "lora"])),
    "full fine-tune": ("full.pt", "file", "--out", lambda d: (lora_finetune.main, [*TINY, "--ckpt", d / "ckpt.pt",
                                                                                  "--full", "--out",
                                                                                  d / "full.pt"])),
}


@pytest.mark.parametrize("which", list(HELD))
def test_a_second_run_on_a_held_output_refuses_naming_the_first(case, capsys, which):
    name, kind, flag, command = HELD[which]
    holder = start_holder(case, case / name, flag, kind)
    try:
        before, names = tree_hash(case), sorted(os.listdir(case))
        main, argv = command(case)
        start = time.perf_counter()
        line = refused(main, argv, capsys)
        assert f"is in use by another run (PID {holder.pid}: " in line and "holder.py" in line, line
        assert f"wait for it to end, or pass another {flag}" in line
        assert time.perf_counter() - start < 10
        assert tree_hash(case) == before and sorted(os.listdir(case)) == names  # nothing written, nothing changed
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_lock_left_by_a_dead_process_is_taken_over_and_said(tmp_path, kind):
    target = tmp_path / ("out" if kind == "folder" else "full.pt")
    holder = start_holder(tmp_path, target, "--out", kind)
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    path = lock_path(str(target), kind == "folder")
    assert os.path.exists(path)  # it exited without removing it, as kill -9 would
    said = []
    try:
        assert lock_output(str(target), "--out", kind == "folder", log=said.append) == path
        assert said == [f"took over the lock {path} left by PID {holder.pid} ({sys.executable} "
                        f"{tmp_path / 'holder.py'} {ROOT} {target} --out {kind} hold), which is no longer running"]
        with pytest.raises(FolderInUse):  # and it is held now, against another open in this very process
            lock_output(str(target), "--out", kind == "folder")
    finally:
        release_locks()
    assert not os.path.exists(path)


def test_a_lock_file_is_no_content_of_an_adapter_folder_and_an_emptied_folder_goes(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / LOCK_NAME).write_text("123\npython lora_finetune.py\n")
    assert file_kind(str(tmp_path / "lora")) == "empty folder"  # a killed run's lock: the folder is still free
    lock_output(str(tmp_path / "new"), "--out", log=lambda line: None)
    release_locks()
    assert not (tmp_path / "new").exists()  # made for the lock, left empty: removed with it


def _script(name, tiny_ckpt, out, *extra):
    if name == "train":
        return [os.path.join(ROOT, "train.py"), *TINY, "--out-dir", str(out), "--sample-every", "0", *extra]
    return [os.path.join(ROOT, "lora_finetune.py"), *TINY, "--ckpt", str(tiny_ckpt), "--out", str(out),
            "--preview-every", "0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "lora_finetune"])
def test_two_runs_started_together_on_one_folder_one_refuses(tmp_path, tiny_ckpt, name):
    """Two real processes, the same command, started at once: one trains, the other stops in one line naming
    the first's PID, exit code 2, its --config unchanged."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nlabel_drop = 0.2\n[lora]\nlora_steps = 100000\n" if name != "train"
                   else "[train]\nlabel_drop = 0.2\nmax_steps = 100000\n")
    before = tree_hash(tmp_path)
    out = tmp_path / ("out" if name == "train" else "lora")
    argv = [sys.executable, *_script(name, tiny_ckpt, out, "--config", str(cfg))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    try:
        deadline = time.time() + 240
        while all(r.poll() is None for r in runs) and time.time() < deadline:
            time.sleep(0.2)
        loser = next(r for r in runs if r.poll() is not None)
        winner = next(r for r in runs if r is not loser)
        err = loser.stderr.read().strip().splitlines()
        assert loser.returncode == 2, err
        assert err[-1].startswith("error: ") and sum("error:" in line for line in err) == 1, err
        assert f"is in use by another run (PID {winner.pid}: {sys.executable} {argv[1]}" in err[-1], err
        assert winner.poll() is None  # still training
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()
            r.wait(timeout=60)
    after = tree_hash(tmp_path)
    assert after[str(cfg)] == before[str(cfg)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "lora_finetune"])
def test_kill_9_mid_write_then_a_rerun_at_once_removes_the_temporary_and_says_so(tmp_path, tiny_ckpt, name):
    """A child holding the output dies by SIGKILL in the middle of a write; the real script, run straight after
    (no pause), takes the lock over, removes the temporary and says both."""
    out = tmp_path / "out"
    target = out if name == "train" else out / "lora"
    child = start_holder(tmp_path, target, then="write file" if name == "train" else "write folder")
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    left = [n for n in os.listdir(out) if is_temp_name(n)]
    assert len(left) == 1 and os.path.exists(lock_path(str(target)))
    steps = ["--max-steps", "2"] if name == "train" else ["--lora-steps", "2"]
    rerun = subprocess.run([sys.executable, *_script(name, tiny_ckpt, target, *steps)], cwd=tmp_path,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"took over the lock {lock_path(str(target))} left by PID {child.pid}" in rerun.stdout
    assert f"removed 1 temporary file left by an interrupted run in {out}" in rerun.stdout
    assert not [n for _, dirs, names in os.walk(tmp_path) for n in names + dirs if is_temp_name(n)]
    assert not os.path.exists(lock_path(str(target)))  # released at the end


@pytest.mark.parametrize("planted", ["link to a file", "fifo", "folder"])
def test_a_lock_file_that_is_no_file_of_ours_is_never_truncated(tmp_path, planted):
    out = tmp_path / "out"
    out.mkdir()
    mine = tmp_path / "notes.txt"
    mine.write_text("mine\n")
    lock = out / LOCK_NAME
    {"link to a file": lambda: os.symlink(mine, lock), "fifo": lambda: os.mkfifo(lock),
     "folder": lambda: lock.mkdir()}[planted]()
    before = tree_hash(tmp_path)
    with pytest.raises(WriteError, match="move it away"):  # one line, exit code 2
        lock_output(str(out), "--out-dir")
    assert tree_hash(tmp_path) == before and mine.read_text() == "mine\n"
