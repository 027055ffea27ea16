"""What a training run leaves for a person to read while it runs: the loss log, its curve, TensorBoard, previews.

    log = LossLog("out/loss.csv", images_per_step=128, resume_step=None)   # None: a fresh log
    log.step(step, loss, lr)          # one row (step, loss, lr, images/s), flushed: readable while training
    log.close()
    loss_curve_png("out/loss.csv", "out/loss_curve.png", "train: tiny preset")
    require_tensorboard()             # before any work: one error with the install command when it is missing
    previews = Previews(base, diffusion, "out/lora/previews", every=50, ...)   # base against adapter, by step
    previews.step(model, step, loss)  # previews/step_0050.png when due (pictures.preview_png)

train.py and lora_finetune.py use these; the loop itself (trainer.py) only calls its hooks. The pictures'
layout is pictures.py's.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import time

import torch

from config import SampleConfig
from diffusion import generate
from errors import CLIError
from files import atomic_write
from pictures import preview_png

LOSS_CSV = "loss.csv"
LOSS_CURVE = "loss_curve.png"
PREVIEW_DIR = "previews"
TENSORBOARD_DIR = "tensorboard"
CSV_FIELDS = ("step", "loss", "lr", "images_per_s")
TENSORBOARD_HINT = "pip install tensorboard"
PREVIEW_STEPS = 10  # DDIM steps of a preview: enough to read the digits, a fraction of a training step's cost
_PREVIEW_NAME = re.compile(r"step_(\d+)\.png")


def require_tensorboard():
    """torch.utils.tensorboard's SummaryWriter, or one CLIError (exit 2) saying how to install its package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch ships the writer, but it needs the tensorboard package
        raise CLIError(f"--tensorboard needs the tensorboard package, which is not installed: {TENSORBOARD_HINT} "
                       "(or drop --tensorboard; the loss is logged to loss.csv either way)") from None
    return SummaryWriter


def read_loss_csv(path):
    """The rows of a loss log as dicts of floats (step as int); rows that do not parse are skipped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            return rows
        for r in reader:
            try:
                rows.append({"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                             "images_per_s": float(r["images_per_s"])})
            except (TypeError, ValueError):  # a line cut short by a hard kill: the rest is still the log
                continue
    return rows


def _write_rows(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_FIELDS)
            for r in rows:
                w.writerow([r["step"], repr(r["loss"]), repr(r["lr"]), f"{r['images_per_s']:.1f}"])
    atomic_write(path, write)


class LossLog:
    """One CSV row per optimizer step, appended and flushed as the run goes (``tail -f`` works), and the
    same scalars to TensorBoard when ``tensorboard_dir`` is given.

    A fresh run (``resume_step`` None) starts a new file. A resumed run keeps the rows up to the step
    it resumes from and drops the ones after it (steps an interrupted run did past its last
    checkpoint, which the resumed run does again), so the log has every step once."""

    def __init__(self, path, images_per_step, resume_step=None, tensorboard_dir=None):
        self.path, self.images_per_step = path, images_per_step
        kept = [r for r in read_loss_csv(path) if r["step"] <= resume_step] if resume_step is not None else []
        _write_rows(path, kept)
        self._file = open(path, "a", newline="")
        self._csv = csv.writer(self._file)
        self._tb = None
        if tensorboard_dir is not None:
            # purge_step: events a previous run wrote after the resume point are discarded, as the CSV rows are
            self._tb = require_tensorboard()(tensorboard_dir,
                                             purge_step=None if resume_step is None else resume_step + 1)
        self._last = time.perf_counter()

    def step(self, step, loss, lr):
        """Log the step just done (``step`` counts from 1, as the checkpoint's step does)."""
        now = time.perf_counter()
        rate = self.images_per_step / max(now - self._last, 1e-9)
        self._last = now
        self._csv.writerow([step, repr(float(loss)), repr(float(lr)), f"{rate:.1f}"])
        self._file.flush()
        if self._tb is not None:
            self._tb.add_scalar("loss", loss, step)
            self._tb.add_scalar("lr", lr, step)
            self._tb.add_scalar("images_per_s", rate, step)

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def smooth(values, window):
    """Trailing mean over ``window`` values (fewer at the start): a diffusion loss jumps with the t drawn."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_png(csv_path, png_path, title):
    """The loss (each step faint, a trailing mean bold, log scale) and the learning rate against the step;
    returns the path, or None when the log holds no rows."""
    rows = read_loss_csv(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    window = max(1, len(rows) // 50)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if window > 1:
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
    ax.plot(steps, smooth(loss, window), color="tab:blue", linewidth=2,
            label=f"mean of the last {window} steps" if window > 1 else "loss per step")
    if min(loss) > 0 and all(math.isfinite(v) for v in loss) and max(loss) > 10 * min(loss):
        ax.set_yscale("log")  # the early drop and the late plateau both visible
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", linewidth=1)
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax.legend(loc="upper right", fontsize=8)
    rate = sorted(r["images_per_s"] for r in rows)[len(rows) // 2]
    ax.set_title(f"{title}\n{len(rows)} steps to step {steps[-1]}, last loss {loss[-1]:.4f}, "
                 f"median {rate:,.0f} images/s", fontsize=10)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return png_path


def fork_rng(device):
    """Leave the run's global random streams exactly as they were (previews must not shift a resumed run)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@dataclasses.dataclass
class LogPaths:
    """Where a run's logs go: inside its output folder, or beside its output file with the file's stem."""
    csv: str
    curve: str
    previews: str
    tensorboard: str

    @classmethod
    def of(cls, out, folder=True):
        if folder:
            return cls(os.path.join(out, LOSS_CSV), os.path.join(out, LOSS_CURVE), os.path.join(out, PREVIEW_DIR),
                       os.path.join(out, TENSORBOARD_DIR))
        stem = os.path.splitext(out)[0]
        return cls(f"{stem}_{LOSS_CSV}", f"{stem}_{LOSS_CURVE}", f"{stem}_{PREVIEW_DIR}", f"{stem}_{TENSORBOARD_DIR}")


def remove_previews_after(folder, step):
    """Delete the preview PNGs of steps after ``step`` (all of them for -1): what an interrupted run drew
    past the point a run resumes from (or an earlier run, for a fresh one), which would otherwise be
    mistaken for this run's."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        m = _PREVIEW_NAME.fullmatch(name)
        if m and int(m[1]) > step:
            os.remove(os.path.join(folder, name))


class Previews:
    """Every ``every`` steps (and at the last), the base and the model being fine-tuned on the same noise, one
    row each and one column per label, as ``folder``/step_NNNN.png, with one line of the loss.

    Cheap by design: a few DDIM steps under no_grad, the base's row sampled once (it is frozen), and the
    run's random streams left as they were, so a resumed run stays bit-identical to one never stopped."""

    def __init__(self, base_model, diffusion, folder, *, every, max_steps, device, precision, data_size, seed,
                 name="adapter", desc="lora", resume_step=None, steps=PREVIEW_STEPS):
        self.diffusion, self.folder, self.every, self.max_steps = diffusion, folder, every, max_steps
        self.device, self.precision, self.data_size, self.seed = device, precision, data_size, seed
        self.name, self.desc = name, desc
        self.cfg = SampleConfig(steps=min(steps, diffusion.timesteps))
        self.labels = torch.arange(base_model.num_classes)
        remove_previews_after(folder, -1 if resume_step is None else resume_step)
        self.base_images = self._sample(base_model)
        self._losses = []

    def _sample(self, model):
        was_training = model.training
        model.eval()  # LoRA dropout off: the adapter as it will be used
        try:
            with fork_rng(self.device):
                images, _ = generate(model, self.diffusion, self.labels, self.device, self.precision, self.cfg,
                                     seed=self.seed, data_size=self.data_size)
        finally:
            model.train(was_training)
        return images

    def step(self, model, step, loss):
        """After ``step`` steps, with that step's ``loss``: a preview and a log line when one is due; returns its path."""
        self._losses.append(loss)
        if not (step % self.every == 0 or step == self.max_steps):
            return None
        path = os.path.join(self.folder, f"step_{step:04d}.png")
        title = (f"{self.desc}: step {step} of {self.max_steps}, base and {self.name} on the same noise "
                 f"(DDIM-{self.cfg.steps}, guidance {self.cfg.guidance:g})")
        preview_png({"base": self.base_images, self.name: self._sample(model)}, self.labels, path, title)
        from tqdm import tqdm  # a line above the progress bar, not through it

        tqdm.write(f"{self.desc}: step {step}/{self.max_steps}, loss {sum(self._losses) / len(self._losses):.4f} "
                   f"(mean of the last {len(self._losses)} steps), preview {path}")
        self._losses = []
        return path
