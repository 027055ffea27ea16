"""Ctrl-C at any moment of a run, then --resume: the same weights, EMA, optimizer and RNG as a run never interrupted.

Each case sends SIGINT to this process from inside one part of a step (the batch, the forward, the
backward, the optimizer step, the EMA update, a checkpoint write, a sample grid) at a chosen call,
as a user's Ctrl-C would land there. One SIGINT must finish the step, save and exit with 130; two
(the second Ctrl-C) must stop at once without saving. Either way, resuming from the checkpoint
left behind (or starting again when there is none) must end tensor for tensor where the
uninterrupted run ends. The runs use 32 images (2 steps an epoch), so checkpoints and sample
grids come every other step and a case takes about a second.
"""
import os
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lora_finetune
import train
import trainer
from adapter_formats import load_adapter
from dataset import Digits
from files import is_temp_name
from diffusion import Diffusion

IMAGES = 32  # batch 16: 2 steps an epoch, so a 6-step run saves at steps 2, 4 and 6
STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and two cores shared with other work thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_data(monkeypatch):
    real = trainer.load_dataset_distributed

    def small(name, split, data_dir, dist_info, log=print):
        d = real(name, split, data_dir, dist_info, log)
        return Digits(d.images[:IMAGES], d.labels[:IMAGES], d.name, d.split, d.classes)
    monkeypatch.setattr(train, "load_dataset_distributed", small)
    monkeypatch.setattr(lora_finetune, "load_dataset_distributed", small)


class Ctrl_C:
    """Sends SIGINT (``times`` of them, as a user pressing Ctrl-C once or twice) on the ``at``-th call."""

    def __init__(self, at, times=1):
        self.at, self.times, self.calls, self.sent = at, times, 0, False

    def __call__(self, *_):
        self.calls += 1
        if self.calls == self.at:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100))  # let Python run the handler before the next signal, as a human's pause would


def wrap(monkeypatch, owner, name, hit, after=False):
    """Replace ``owner.name`` by a function that calls ``hit`` before (or after) the original."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if not after:
            hit()
        result = original(*args, **kwargs)
        if after:
            hit()
        return result
    monkeypatch.setattr(owner, name, wrapped)


def inside_forward(monkeypatch, hit):
    """The hit lands inside the training forward pass (between the noisy input and the UNet's output)."""
    original = Diffusion.loss

    def loss(self, model, *args):
        return original(self, lambda *a: (hit(), model(*a))[1], *args)
    monkeypatch.setattr(Diffusion, "loss", loss)


def inside_backward(monkeypatch, hit):
    original = Diffusion.loss

    def loss(self, *args):
        out = original(self, *args)
        out.register_hook(lambda grad: hit())
        return out
    monkeypatch.setattr(Diffusion, "loss", loss)


def inside_optimizer_step(monkeypatch, hit, after=False):
    register = register_optimizer_step_post_hook if after else register_optimizer_step_pre_hook
    return register(lambda *a: hit())  # a handle: the test removes the hook after the run


# where: (a name, how to install the hit). Calls count from the start of the run: the training
# steps are calls 1..6 of the step parts; checkpoints and grids come after steps 2, 4 and 6.
TRAIN_POINTS = {
    "drawing the batch": lambda mp, hit: wrap(mp, trainer.TrainData, "batch", hit),
    "after the batch, before the forward": lambda mp, hit: wrap(mp, trainer.TrainData, "batch", hit, after=True),
    "inside the forward": inside_forward,
    "after the loss, before the backward": lambda mp, hit: wrap(mp, Diffusion, "loss", hit, after=True),
    "inside the backward": inside_backward,
    "between backward and optimizer step": lambda mp, hit: wrap(mp, torch.nn.utils, "clip_grad_norm_", hit),
    "inside the optimizer step": lambda mp, hit: inside_optimizer_step(mp, hit),
    "after the optimizer step, before the EMA": lambda mp, hit: inside_optimizer_step(mp, hit, after=True),
    "inside the EMA update": lambda mp, hit: wrap(mp, train, "ema_update", hit),
    "after the EMA, at the loss sync": lambda mp, hit: wrap(mp, trainer, "all_reduce_mean", hit),
    "inside the checkpoint write": lambda mp, hit: wrap(mp, torch, "save", hit),
    "after the checkpoint data, before its rename": lambda mp, hit: wrap(mp, torch, "save", hit, after=True),
    "writing config.json": lambda mp, hit: wrap(mp, train, "write_json", hit),
    "sampling the grid": lambda mp, hit: wrap(mp, train, "generate", hit),
    "writing the grid": lambda mp, hit: wrap(mp, train, "save_grid", hit),
}

SAVING = ("inside the checkpoint write", "after the checkpoint data, before its rename", "sampling the grid",
          "writing the grid")
# (point, call, times): mid-run calls, so a checkpoint exists before and steps remain after: step 3,
# or the checkpoint and grid after step 4
TRAIN_CASES = [(p, 2 if p in SAVING else 3, 1) for p in TRAIN_POINTS if p != "writing config.json"] + [
    ("writing config.json", 1, 1),  # with the first checkpoint, after step 2
    ("inside the checkpoint write", 1, 1),  # the first checkpoint: config.json not yet written
    ("inside the forward", 1, 2),  # the second Ctrl-C before any checkpoint: nothing to resume, start again
    ("inside the forward", 3, 2),
    ("inside the backward", 4, 2),
    ("inside the optimizer step", 5, 2),
    ("after the optimizer step, before the EMA", 3, 2),
    ("inside the EMA update", 4, 2),
    ("inside the checkpoint write", 2, 2),  # the second checkpoint half written: the first one stays
    ("after the checkpoint data, before its rename", 2, 2),
    ("sampling the grid", 2, 2),
]


# a few cases run in the quick suite; --runslow runs them all
QUICK = {("inside the forward", 3, 1), ("inside the optimizer step", 3, 1), ("inside the checkpoint write", 2, 2),
         ("inside the backward", 4, 2)}
TRAIN_PARAMS = [pytest.param(*case, id=f"{case[0]} #{case[1]} x{case[2]}",
                             marks=() if case in QUICK else pytest.mark.slow) for case in TRAIN_CASES]


def train_argv(out_dir, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--max-steps", str(STEPS),
            "--out-dir", str(out_dir), *extra]


def tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def assert_same_state(a, b, parts):
    """torch.equal on every tensor of ``parts`` (model, ema, optimizer, rng...); returns how many were compared."""
    ta = {k: v for p in parts for k, v in tensors(a[p], p).items()}
    tb = {k: v for p in parts for k, v in tensors(b[p], p).items()}
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not (ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]))]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"
    return len(ta)


_reference = {}  # the uninterrupted run, made once per session (small_data is patched per test)


def reference_train(tmp_path_factory):
    if "train" not in _reference:
        out = tmp_path_factory.mktemp("straight")
        train.main(train_argv(out))
        _reference["train"] = torch.load(out / "ckpt.pt", weights_only=True)
    return _reference["train"]


def test_two_uninterrupted_runs_are_identical(small_data, tmp_path_factory, tmp_path):
    a = reference_train(tmp_path_factory)
    train.main(train_argv(tmp_path))
    b = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    assert assert_same_state(a, b, ("model", "ema", "optimizer", "rng")) > 100


@pytest.mark.parametrize("point,at,times", TRAIN_PARAMS)
def test_train_interrupted_anywhere_resumes_exactly(small_data, tmp_path_factory, tmp_path, monkeypatch, capsys,
                                                    point, at, times):
    straight = reference_train(tmp_path_factory)
    ckpt_path = tmp_path / "ckpt.pt"
    hit = Ctrl_C(at, times)
    with monkeypatch.context() as mp:
        handle = TRAIN_POINTS[point](mp, hit)
        try:
            with pytest.raises(SystemExit) as e:
                train.main(train_argv(tmp_path))
        finally:
            if handle is not None:
                handle.remove()
    err = capsys.readouterr().err
    assert hit.sent and e.value.code == 130, err
    assert "Traceback" not in err
    if times == 1:
        saved = torch.load(ckpt_path, weights_only=True)
        assert "saved; continue with: python train.py --resume " + str(ckpt_path) in err
        assert 0 < saved["step"] < STEPS
    else:
        if ckpt_path.exists():  # a second Ctrl-C inside a step: the hint names the checkpoint there is
            assert "nothing saved since the last checkpoint" in err and "--resume " + str(ckpt_path) in err, err
        else:  # ... or says there is none, instead of a --resume that would fail
            assert "before anything was saved: start the run again" in err or "without finishing" in err, err
    leftovers = [n for _, _, names in os.walk(tmp_path) for n in names if is_temp_name(n) or n.endswith(".tmp")]
    assert not leftovers  # a write cut short leaves no temporary file
    if ckpt_path.exists():
        train.main(train_argv(tmp_path, "--resume", str(ckpt_path)))
    else:  # stopped before the first checkpoint: nothing was written, so the run starts again
        assert not (tmp_path / "config.json").exists()
        train.main(train_argv(tmp_path))
    resumed = torch.load(ckpt_path, weights_only=True)
    assert resumed["step"] == STEPS
    assert assert_same_state(straight, resumed, ("model", "ema", "optimizer", "rng")) > 100


@pytest.mark.parametrize("recipe", [("--objective", "eps"), ("--objective", "edm", "--t-sampling", "lognormal"),
                                    ("--objective", "v", "--zero-terminal-snr", "--t-sampling", "lognormal"),
                                    ("--objective", "v", "--no-bounded-loss")],
                         ids=lambda r: " ".join(r))
def test_every_objective_resumes_exactly(small_data, tmp_path_factory, tmp_path, monkeypatch, capsys, recipe):
    """Ctrl-C inside a forward pass and --resume give the uninterrupted run's state under each objective and
    noise-level distribution (the log-normal draw comes from the saved generator as the uniform one does)."""
    straight_dir, ckpt_path = tmp_path / "straight", tmp_path / "run" / "ckpt.pt"
    train.main(train_argv(straight_dir, *recipe))
    straight = torch.load(straight_dir / "ckpt.pt", weights_only=True)
    assert straight["config"]["diffusion"]["objective"] == recipe[1]  # the checkpoint records its objective
    assert straight["config"]["diffusion"]["bounded_loss"] == ("--no-bounded-loss" not in recipe)  # and its loss
    hit = Ctrl_C(3, 1)
    with monkeypatch.context() as mp:
        handle = inside_forward(mp, hit)
        try:
            with pytest.raises(SystemExit) as e:
                train.main(train_argv(ckpt_path.parent, *recipe))
        finally:
            if handle is not None:
                handle.remove()
    assert hit.sent and e.value.code == 130, capsys.readouterr().err
    assert 0 < torch.load(ckpt_path, weights_only=True)["step"] < STEPS
    train.main(train_argv(ckpt_path.parent, *recipe, "--resume", str(ckpt_path)))
    resumed = torch.load(ckpt_path, weights_only=True)
    assert resumed["step"] == STEPS
    assert assert_same_state(straight, resumed, ("model", "ema", "optimizer", "rng")) > 100
    default = reference_train(tmp_path_factory)  # and the recipe did change what was learnt
    assert any(not torch.equal(default["model"][k], resumed["model"][k]) for k in default["model"])


# ------------------------------------------------------------------ lora_finetune.py

def write_adapter_file(monkeypatch, hit):
    import adapter_formats
    wrap(monkeypatch, adapter_formats, "save_safetensors", hit)


LORA_POINTS = {
    "drawing the batch": TRAIN_POINTS["drawing the batch"],
    "inside the forward": inside_forward,
    "inside the backward": inside_backward,
    "inside the optimizer step": TRAIN_POINTS["inside the optimizer step"],
    "after the optimizer step": TRAIN_POINTS["after the optimizer step, before the EMA"],
    "writing the training state": TRAIN_POINTS["inside the checkpoint write"],
    "writing the adapter tensors": write_adapter_file,
}
LORA_CASES = [(p, 2 if "writing" in p else 3, 1) for p in LORA_POINTS] + [
    ("inside the backward", 3, 2), ("inside the optimizer step", 5, 2), ("writing the training state", 2, 2),
    ("writing the adapter tensors", 2, 2)]
LORA_QUICK = {("inside the backward", 3, 1), ("writing the adapter tensors", 2, 2)}
LORA_PARAMS = [pytest.param(*case, id=f"{case[0]} #{case[1]} x{case[2]}",
                            marks=() if case in LORA_QUICK else pytest.mark.slow) for case in LORA_CASES]


def lora_argv(base, out, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--lora-steps", str(STEPS), "--ckpt",
            str(base), "--out", str(out), *extra]


def lora_state(out):
    return torch.load(os.path.join(out, "training_state.pt"), weights_only=True)


def reference_lora(tmp_path_factory, base):
    if "lora" not in _reference:
        out = tmp_path_factory.mktemp("straight_lora") / "lora"
        lora_finetune.main(lora_argv(base, out))
        _reference["lora"] = (lora_state(out), load_adapter(str(out)))
    return _reference["lora"]


@pytest.mark.parametrize("point,at,times", LORA_PARAMS)
def test_finetune_interrupted_anywhere_resumes_exactly(small_data, tmp_path_factory, tmp_path, tiny_ckpt, monkeypatch,
                                                       capsys, point, at, times):
    straight, straight_adapter = reference_lora(tmp_path_factory, tiny_ckpt)
    out = tmp_path / "lora"
    hit = Ctrl_C(at, times)
    with monkeypatch.context() as mp:
        handle = LORA_POINTS[point](mp, hit)
        try:
            with pytest.raises(SystemExit) as e:
                lora_finetune.main(lora_argv(tiny_ckpt, out))
        finally:
            if handle is not None:
                handle.remove()
    err = capsys.readouterr().err
    assert hit.sent and e.value.code == 130, err
    assert "Traceback" not in err
    if times == 1:
        assert f"saved; continue with: python lora_finetune.py --ckpt {tiny_ckpt} --resume {out} --out {out}" in err
        assert 0 < lora_state(out)["step"] < STEPS
    if os.path.exists(os.path.join(out, "training_state.pt")):
        lora_finetune.main(lora_argv(tiny_ckpt, out, "--resume", str(out)))
    else:
        lora_finetune.main(lora_argv(tiny_ckpt, out))
    resumed = lora_state(out)
    assert resumed["step"] == STEPS
    assert assert_same_state(straight, resumed, ("lora", "optimizer", "rng")) > 10
    shared = load_adapter(str(out))
    assert shared.tensors.keys() == straight_adapter.tensors.keys()
    assert all(torch.equal(shared.tensors[k], straight_adapter.tensors[k]) for k in shared.tensors)
