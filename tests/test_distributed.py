"""torchrun support: the data and noise sharding, and train.py / lora_finetune.py under 2 gloo processes.

The design that makes a run on N processes equal to one process on the same global batch:
``epoch_batches`` gives rank r every N-th example of each global batch, ``draw_batch_noise`` draws
t, noise and label drop for the whole global batch on every rank from one generator and slices
them the same way, and DDP averages the gradients of equal-sized shards, which is the gradient of
the global batch's mean loss. The end-to-end tests check that this holds after one optimizer step
(on the CPU, in fp32), that only rank 0 writes or prints, that the checkpoint has the single-process
format and samples in denoise.py, and that --resume under torchrun continues where it stopped.

    python -m pytest -q --runslow tests/test_distributed.py
"""
import contextlib
import glob
import io
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import denoise
import lora_finetune
import train
from config import ModelConfig
from errors import CLIError
from adapter_formats import load_adapter, load_training_state
from checkpoint import load_checkpoint
from runtime import Dist, per_rank_batch
from trainer import draw_batch_noise, epoch_batches
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
# one optimizer step of the tiny preset on the CPU in fp32; --device cpu so that a GPU machine runs
# the same gloo test (two processes on one GPU would need NCCL to share it)
COMMON = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--dataset", "mnist-5k"]
TRAIN = COMMON + ["--sample-every", "0"]


# ----------------------------------------------------------- sharding, no processes

@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_batches_shards_each_global_batch(world):
    """Interleaving the ranks' shards rebuilds exactly the single-process batch; shards are disjoint."""
    n, batch = 100, 12
    single = epoch_batches(n, batch, epoch=3, seed=7, dist_info=Dist())
    shards = [epoch_batches(n, batch, epoch=3, seed=7, dist_info=Dist(r, world)) for r in range(world)]
    assert len(single) == n // batch and all(len(s) == len(single) for s in shards)
    for k, full in enumerate(single):
        rebuilt = torch.empty_like(full)
        for r in range(world):
            rebuilt[r::world] = shards[r][k]
        assert torch.equal(rebuilt, full)
        seen = torch.cat([shards[r][k] for r in range(world)])
        assert len(set(seen.tolist())) == batch  # no example on two ranks


def test_epoch_batches_reshuffle_every_epoch():
    """Each rank gets a different shard every epoch (DistributedSampler.set_epoch), the same on every call."""
    d = Dist(1, 2)
    e0, e1 = epoch_batches(64, 8, 0, 0, d), epoch_batches(64, 8, 1, 0, d)
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert all(torch.equal(a, b) for a, b in zip(e0, epoch_batches(64, 8, 0, 0, d)))


def test_draw_batch_noise_slices_the_global_draw():
    """Every rank draws the whole global batch from the same generator: the slices rebuild one process's draw."""
    shape, batch = (1, 4, 4), 6
    full = draw_batch_noise(torch.Generator().manual_seed(5), batch, 50, 0.5, shape, Dist())
    parts = [draw_batch_noise(torch.Generator().manual_seed(5), batch, 50, 0.5, shape, Dist(r, WORLD))
             for r in range(WORLD)]
    for i, whole in enumerate(full):
        rebuilt = torch.empty_like(whole)
        for r in range(WORLD):
            rebuilt[r::WORLD] = parts[r][i]
        assert torch.equal(rebuilt, whole)


def test_draw_batch_noise_keeps_t_in_its_range():
    """A fine-tune's --lora-t-range: every t in lo..hi-1, both ends reached; no range is every step."""
    g = torch.Generator().manual_seed(0)
    t, _, _ = draw_batch_noise(g, 4000, 50, 0.0, (1, 2, 2), Dist(), t_range=(10, 40))
    assert t.min().item() == 10 and t.max().item() == 39
    t_all, _, _ = draw_batch_noise(torch.Generator().manual_seed(0), 4000, 50, 0.0, (1, 2, 2), Dist())
    assert t_all.min().item() == 0 and t_all.max().item() == 49
    same, _, _ = draw_batch_noise(torch.Generator().manual_seed(0), 4000, 50, 0.0, (1, 2, 2), Dist(), t_range=(0, 50))
    assert torch.equal(same, t_all)  # the full range is the draw of a run without one


def test_per_rank_batch_scopes():
    assert per_rank_batch(16, "global", 2) == (8, 16)
    assert per_rank_batch(16, "per-rank", 2) == (16, 32)
    assert per_rank_batch(16, "global", 1) == (16, 16)
    with pytest.raises(CLIError, match="does not split over 3"):
        per_rank_batch(16, "global", 3)


# ---------------------------------------------------------------------- helpers

def run_torchrun(script, args, log_dir):
    """``torchrun --nproc_per_node=2 --standalone script args``; returns {rank: stdout + stderr}.

    --redirects 3 makes torchrun write each rank's stdout and stderr to its own file under
    log_dir, which is how the test tells what rank 1 printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--standalone",
           "--log-dir", str(log_dir), "--redirects", "3", os.path.join(ROOT, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = {}
    for rank in range(WORLD):
        texts = {}
        for stream in ("stdout", "stderr"):
            found = glob.glob(os.path.join(str(log_dir), "**", "attempt_0", str(rank), f"{stream}.log"),
                              recursive=True)
            texts[stream] = "".join(open(p).read() for p in found)
        logs[rank] = texts
    assert proc.returncode == 0, (f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                                  + "\n".join(f"--- rank {r} ---\n{t['stdout']}\n{t['stderr']}"
                                              for r, t in logs.items()))
    return logs


def run_inprocess(main, args):
    """A script's main() in this process (one rank); returns what it printed to stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(args)
    return buf.getvalue()


def final_loss(text, word="final loss"):
    m = re.search(rf"{word} ([0-9.]+)", text)
    assert m, f"no '{word}' in:\n{text}"
    return float(m.group(1))


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def param_names(ckpt):
    return [n for n, _ in UNet(ModelConfig(**ckpt["config"]["model"])).named_parameters()]


def assert_one_adam_step_equal(single, multi, names, states, lr):
    """Equal gradients and equal weights after Adam's first step, to fp32 rounding.

    The gradient is read back from Adam's first moment (exp_avg = (1 - beta1) g after one step).
    Adam's first update is lr * g / (|g| + eps): where g is rounding noise (~1e-9: the biases
    right before a GroupNorm of one channel per group, whose true gradient is 0) that ratio is
    noise of size up to 1, so those weights may differ by up to 2 lr between any two summation
    orders; everywhere the gradient is real the weights must agree to 1e-5."""
    checked = total = 0
    for i, name in enumerate(names):
        ga, gb = single["optimizer"]["state"][i]["exp_avg"], multi["optimizer"]["state"][i]["exp_avg"]
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-8, msg=lambda m: f"gradient of {name}: {m}")
        real = ga.abs() > 1e-7  # |g| > 1e-6: three orders above the rounding noise of the all-reduce
        checked += int(real.sum())
        total += real.numel()
        for key in states:
            wa, wb = single[key][name], multi[key][name]
            diff = (wa - wb).abs()
            worst = float(diff[real].max()) if real.any() else 0.0
            assert worst <= 1e-5, f"{key}.{name} differs by {worst:.2e} where the gradient is real"
            assert diff.max() <= 2 * lr, f"{key}.{name} differs by {diff.max():.2e} > 2 lr"
    assert checked > 0.5 * total, f"only {checked} of {total} weights had a gradient above rounding noise"


# ------------------------------------------------------------- train.py, end to end

@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """train.py in this process: one step on global batch 16."""
    out = tmp_path_factory.mktemp("single")
    text = run_inprocess(train.main, TRAIN + ["--max-steps", "1", "--out-dir", str(out)])
    return out, text


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """train.py under torchrun with 2 processes: one step on global batch 16 (8 per rank)."""
    out = tmp_path_factory.mktemp("ddp")
    logs = run_torchrun("train.py", TRAIN + ["--max-steps", "1", "--out-dir", str(out)],
                        tmp_path_factory.mktemp("ddp_logs"))
    return out, logs


@pytest.mark.slow
def test_ddp_one_step_equals_single_process(single_run, ddp_run):
    (s_out, s_text), (d_out, logs) = single_run, ddp_run
    single, multi = load_checkpoint(str(s_out / "ckpt.pt")), load_checkpoint(str(d_out / "ckpt.pt"))
    assert single["step"] == multi["step"] == 1
    # every rank drew the global batch's noise from the one generator, as the single process did
    assert torch.equal(single["rng"]["noise"], multi["rng"]["noise"])
    assert_one_adam_step_equal(single, multi, param_names(single), ("model", "ema"),
                               lr=single["config"]["train"]["lr"])
    # the logged loss is the global batch's (all-reduced), not rank 0's half
    assert abs(final_loss(logs[0]["stdout"]) - final_loss(s_text)) <= 2e-4


@pytest.mark.slow
def test_ddp_only_rank0_writes_and_prints(single_run, ddp_run):
    (s_out, _), (d_out, logs) = single_run, ddp_run
    assert files_under(d_out) == files_under(s_out) == ["ckpt.pt", "config.json", "loss.csv", "loss_curve.png",
                                                        os.path.join("samples", "final.png")]
    assert logs[0]["stdout"].count("train:") >= 3
    assert "2 process(es) x batch 8 = global batch 16, lr 0.002" in logs[0]["stdout"]
    assert "it/s" in logs[0]["stderr"]  # rank 0's progress bar
    assert logs[1]["stdout"] == "", f"rank 1 printed:\n{logs[1]['stdout']}"
    assert not re.search(r"train|it/s|\d+%\|", logs[1]["stderr"]), f"rank 1 printed:\n{logs[1]['stderr']}"


@pytest.mark.slow
def test_ddp_checkpoint_has_single_process_format_and_samples(single_run, ddp_run, tmp_path):
    (s_out, _), (d_out, _) = single_run, ddp_run
    single, multi = load_checkpoint(str(s_out / "ckpt.pt")), load_checkpoint(str(d_out / "ckpt.pt"))
    assert set(multi) == set(single)
    for key in ("model", "ema"):
        assert list(multi[key]) == list(single[key])  # the unwrapped model: no "module." prefix
    assert multi["config"]["model"] == single["config"]["model"]
    written = denoise.main(["--ckpt", str(d_out / "ckpt.pt"), "--out-dir", str(tmp_path), "--steps", "3",
                            "--device", "cpu", "--frames", "0"])
    assert all(os.path.exists(p) for p in written)


@pytest.mark.slow
def test_ddp_resume_continues_from_saved_step(ddp_run, tmp_path):
    """Stopped after step 1 and resumed to 2 under torchrun == 2 steps without a stop.

    The uninterrupted run holds the per-rank batch (8) instead of the global one: the same global
    batch of 16, so the same run, which also pins --batch-scope per-rank."""
    d_out, _ = ddp_run
    resumed = tmp_path / "resumed"
    shutil.copytree(d_out, resumed)
    logs = run_torchrun("train.py", TRAIN + ["--max-steps", "2", "--out-dir", str(resumed), "--resume"],
                        tmp_path / "logs_resumed")
    assert "steps 1->2" in logs[0]["stdout"]
    straight = tmp_path / "straight"
    logs = run_torchrun("train.py", TRAIN + ["--max-steps", "2", "--out-dir", str(straight),
                                             "--batch-scope", "per-rank", "--batch-size", "8"],
                        tmp_path / "logs_straight")
    assert "2 process(es) x batch 8 = global batch 16" in logs[0]["stdout"]
    a, b = load_checkpoint(str(resumed / "ckpt.pt")), load_checkpoint(str(straight / "ckpt.pt"))
    assert a["step"] == b["step"] == 2
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"])
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=1e-6,
                                       msg=lambda m: f"{key}.{name}: {m}")


# ------------------------------------------------------- lora_finetune.py, end to end

def lora_args(base, out, steps):
    return COMMON + ["--ckpt", str(base), "--out", str(out), "--lora-steps", str(steps)]


@pytest.fixture(scope="module")
def lora_runs(single_run, tmp_path_factory):
    """A LoRA step on the single-process base: once in this process, once under torchrun."""
    base = single_run[0] / "ckpt.pt"
    s_dir, d_dir = tmp_path_factory.mktemp("lora_single"), tmp_path_factory.mktemp("lora_ddp")
    s_text = run_inprocess(lora_finetune.main, lora_args(base, s_dir / "lora", 1))
    logs = run_torchrun("lora_finetune.py", lora_args(base, d_dir / "lora", 1),
                        tmp_path_factory.mktemp("lora_logs"))
    return base, (s_dir, s_text), (d_dir, logs)


def assert_adapters_close(a, b, atol=1e-5):
    assert list(a.tensors) == list(b.tensors)
    for k in a.tensors:
        torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_lora_ddp_one_step_equals_single_process(lora_runs):
    _, (s_dir, s_text), (d_dir, logs) = lora_runs
    single, multi = load_training_state(s_dir / "lora"), load_training_state(d_dir / "lora")
    assert single.step == multi.step == 1
    assert load_adapter(s_dir / "lora").base_fingerprint == load_adapter(d_dir / "lora").base_fingerprint
    assert_adapters_close(load_adapter(s_dir / "lora"), load_adapter(d_dir / "lora"))
    assert_adapters_close(single, multi)
    for i, st in single.optimizer["state"].items():  # the LoRA gradients (Adam's exp_avg)
        torch.testing.assert_close(multi.optimizer["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-4, atol=1e-9)
    # B starts at zero, so A gets no gradient on the first step; B must have moved
    assert any(v.abs().max() > 0 for k, v in multi.tensors.items() if k.endswith("lora_B"))
    assert abs(final_loss(logs[0]["stdout"], "loss") - final_loss(s_text, "loss")) <= 2e-4


@pytest.mark.slow
def test_lora_ddp_only_rank0_writes_and_adapter_samples(lora_runs, tmp_path):
    base, _, (d_dir, logs) = lora_runs
    assert files_under(d_dir) == ["lora/README.md", "lora/adapter_config.json", "lora/adapter_model.safetensors",
                                  "lora/loss.csv",
                                  "lora/loss_curve.png", "lora/previews/step_0001.png", "lora/training_state.pt"]
    assert "2 process(es) x batch 8 = global batch 16" in logs[0]["stdout"]
    assert logs[1]["stdout"] == "", f"rank 1 printed:\n{logs[1]['stdout']}"
    assert not re.search(r"lora|it/s|\d+%\|", logs[1]["stderr"]), f"rank 1 printed:\n{logs[1]['stderr']}"
    written = denoise.main(["--ckpt", str(base), "--lora", str(d_dir / "lora"), "--merge",
                            "--out-dir", str(tmp_path), "--steps", "3", "--device", "cpu", "--frames", "0"])
    assert all(os.path.exists(p) for p in written)


@pytest.mark.slow
def test_lora_ddp_resume_continues_from_saved_step(lora_runs, tmp_path):
    """Resumed under torchrun from step 1 to 2 == two steps in one process (the LoRA gradients are all real)."""
    base, _, (d_dir, _) = lora_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(d_dir / "lora", resumed)
    logs = run_torchrun("lora_finetune.py", lora_args(base, resumed, 2) + ["--resume"], tmp_path / "logs")
    assert "steps 1->2" in logs[0]["stdout"]
    straight = tmp_path / "straight"
    run_inprocess(lora_finetune.main, lora_args(base, straight, 2))
    a, b = load_training_state(resumed), load_training_state(straight)
    assert a.step == b.step == 2
    assert_adapters_close(b, a)
