"""The page's fine-tune: ``lora_finetune.py`` as a child process of the server, one at a time, its progress read
from the loss.csv it writes.

    runner = Runner(ckpt, "ema", "fast", RuntimeConfig(device="cpu"), "out/app/adapters")
    job = runner.start("mine", 300, prepare=lambda: "out/app/styles/mine.npz")   # one at a time
    job.progress()    # Progress: step, steps, loss, seconds left, done, ok, the last lines of its output

The command's settings come from a LoraConfig and a RuntimeConfig (cli.config_flags), never typed out here, so
a renamed flag cannot leave the page behind. Progress is the run's own log (logs.read_loss_csv: a row a step),
not its progress bar's text.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from cli import config_flags
from config import LoraConfig, RuntimeConfig, preset_config
from errors import UserError
from logs import LogPaths, read_loss_csv

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = "lora_finetune.py"
RATE_ROWS = 20  # the time left is reckoned from the pace of the last this many steps


class JobError(UserError):
    """A fine-tune that cannot be started: the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    """What the fine-tune runs on and writes, apart from its settings: the base, its weights, the adapter folder,
    the preset the settings start from."""
    ckpt: str
    weights: str
    out: str
    preset: str


def finetune_command(spec, lcfg, rcfg):
    """``python lora_finetune.py`` with ``lcfg`` (a LoraConfig) and ``rcfg`` (a RuntimeConfig) as flags: those
    fields that differ from the preset's (cli.config_flags), so the script's own defaults fill the rest."""
    return [sys.executable, os.path.join(HERE, SCRIPT), "--preset", spec.preset, "--ckpt", spec.ckpt,
            "--weights", spec.weights, "--out", spec.out,
            *config_flags(lcfg, preset_config(LoraConfig, spec.preset)), *config_flags(rcfg, RuntimeConfig())]


def shown_command(cmd):
    """The command as someone would type it in this folder."""
    return shlex.join(["python", SCRIPT, *cmd[2:]])


def _death_signal():
    """A function the child runs between fork and exec: SIGTERM to it when the thread that started it dies,
    even by kill -9 of the server (Linux's PR_SET_PDEATHSIG); None elsewhere, where atexit and Stop remain.

    Looked up here, in the parent: between fork and exec a threaded process must not import or load."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


_JOBS = set()


@atexit.register
def _stop_all():
    for job in list(_JOBS):
        job.stop()


@dataclasses.dataclass
class Progress:
    step: int  # steps done, from loss.csv
    steps: int  # steps in all
    loss: float | None  # the last step's
    seconds_left: float | None  # at the pace of the last RATE_ROWS steps
    done: bool
    ok: bool
    returncode: int | None
    tail: list  # the last lines of the run's output, for a run that failed
    previews: list  # the preview pictures written so far, oldest first
    curve: str | None = None  # the loss curve, once the run has drawn it
    stopped: bool = False  # ended by Stop: it saved where it was, for Resume

    def html(self):
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        left = f", about {self.seconds_left:.0f} s left" if self.seconds_left is not None and not self.done else ""
        return (f"<progress value='{self.step}' max='{max(self.steps, 1)}'></progress> step {self.step} of "
                f"{self.steps}{loss}{left}")


class FineTune:
    """A fine-tune as a child process of the server, its output in a log file.

    The child is started and waited on by one dedicated thread, so its parent-death signal is tied to a
    thread that lives exactly as long as it; stopping the server, atexit or the page's Stop end it."""

    def __init__(self, cmd, out, log_path, steps=None, batch=None, session=None):
        self.cmd, self.out, self.log_path, self.session = cmd, out, log_path, session
        self.steps, self.batch = steps, batch  # for the progress: steps in all, images a step
        self.proc = None
        self.returncode = None
        self.stopped = False
        self._ready = threading.Event()
        self._error = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="finetune")
        self.thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise JobError(f"could not start the fine-tune: {self._error}")

    def _run(self):
        try:
            with open(self.log_path, "wb") as log:
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=HERE, env=env, preexec_fn=_death_signal())
                _JOBS.add(self)
                self._ready.set()
                self.returncode = self.proc.wait()
        except OSError as e:
            self._error = e
            self._ready.set()
        finally:
            _JOBS.discard(self)

    def running(self):
        return self.proc is not None and self.returncode is None and self.proc.poll() is None

    def stop(self, timeout=10, save=False):
        """End the run: with ``save``, as Ctrl-C does (the step finishes, the adapter and its training state are
        saved, so Resume carries on), else at once; a run that does neither in ``timeout`` s is killed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.stopped = save
        if save:
            self.proc.send_signal(signal.SIGINT)
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout * (6 if save else 1))  # a step and a save: seconds on a CPU
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _tail(self, lines=3):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 20_000))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-lines:]

    def progress(self):
        """Steps, loss and time left from the run's loss.csv; its previews; how it ended."""
        rows = read_loss_csv(LogPaths.of(self.out).csv)
        step = rows[-1]["step"] if rows else 0
        steps = self.steps or step
        recent = rows[-RATE_ROWS:]
        left = None
        if recent and self.batch and all(r["images_per_s"] > 0 for r in recent):
            # a row's images_per_s is the batch over that step's time
            left = self.batch * sum(1 / r["images_per_s"] for r in recent) / len(recent) * max(0, steps - step)
        done = self.proc is not None and not self.running()
        previews = []
        if os.path.isdir(self.out):
            for dirpath, _, filenames in os.walk(self.out):
                previews += [os.path.join(dirpath, n) for n in filenames if n.endswith(".png")]
        previews.sort(key=os.path.getmtime)
        code = self.proc.returncode if done else None
        curve = LogPaths.of(self.out).curve
        return Progress(step, steps, rows[-1]["loss"] if rows else None, left, done,
                        done and code == 0 and not self.stopped, code, self._tail() if done else [],
                        [p for p in previews if p != curve], curve if os.path.exists(curve) else None,
                        self.stopped)


class Runner:
    """The one fine-tune the server runs at a time (a CPU has room for one), in FOLDER/NAME with its log beside.

    Server state, not a visitor's: which page started the run is kept (``session``) so that it stops when that
    page goes away."""

    def __init__(self, ckpt, weights, preset, runtime, folder):
        self.ckpt, self.weights, self.preset, self.runtime, self.folder = ckpt, weights, preset, runtime, folder
        self.job = None

    def running(self):
        return self.job is not None and self.job.running()

    def writing(self):
        """The folder a running fine-tune is writing (not an adapter to list yet), or None."""
        return self.job.out if self.running() else None

    def settings(self, data, steps):
        """The LoraConfig of a fine-tune on ``data`` for ``steps`` steps: the preset's, checked by LoraConfig."""
        try:
            return preset_config(LoraConfig, self.preset, data=data, lora_steps=steps)
        except (ValueError, TypeError) as e:
            raise JobError(f"fine-tune {e}") from None

    def start(self, name, steps, prepare, session=None):
        """Start a fine-tune into FOLDER/``name`` for ``steps`` steps on the data ``prepare()`` writes (it returns
        the path). Everything is checked before ``prepare`` runs, so a refused start writes nothing."""
        if self.running():
            raise JobError(f"a fine-tune is already running ({os.path.basename(self.job.out)}); wait for it to "
                           "finish or stop it")
        out = os.path.join(self.folder, name)
        if os.path.lexists(out):
            raise JobError(f"an adapter named {name!r} exists ({out}); choose another name")
        self.settings("", steps)  # the steps checked before anything is written
        lcfg = self.settings(prepare(), steps)
        os.makedirs(self.folder, exist_ok=True)
        cmd = finetune_command(FinetuneSpec(self.ckpt, self.weights, out, self.preset), lcfg, self.runtime)
        self.job = FineTune(cmd, out, out + ".log", steps=lcfg.lora_steps, batch=lcfg.lora_batch_size,
                            session=session)
        return self.job

    def stop(self, session=None):
        """Stop the running fine-tune (only if ``session`` started it, when given); whether one was stopped.
        The page's Stop (no ``session``) saves it for Resume; a page that went away ends it at once."""
        if not self.running() or session is not None and self.job.session != session:
            return False
        self.job.stop(save=session is None)
        return True

    def stopped(self):
        """The fine-tunes under FOLDER saved before their last step, oldest first: what Resume offers."""
        from adapter_formats import STATE_NAME, load_training_state

        runs = []
        if not os.path.isdir(self.folder):
            return runs
        for name in sorted(os.listdir(self.folder)):
            out = os.path.join(self.folder, name)
            if out == self.writing() or not os.path.isfile(os.path.join(out, STATE_NAME)):
                continue
            try:
                state = load_training_state(out)
            except UserError:  # a damaged state cannot be resumed: it is not offered
                continue
            steps = int(state.config.get("lora_steps", 0))
            if state.step < steps:
                runs.append(StoppedRun(name, out, int(state.step), steps))
        return runs

    def resume(self, name, session=None):
        """Carry on the stopped fine-tune FOLDER/``name`` (lora_finetune.py --resume, its own settings)."""
        if self.running():
            raise JobError(f"a fine-tune is already running ({os.path.basename(self.job.out)}); wait for it to "
                           "finish or stop it")
        run = next((r for r in self.stopped() if r.name == name), None)
        if run is None:
            raise JobError(f"no fine-tune named {name!r} was stopped part-way; pick one from the list")
        cmd = [sys.executable, os.path.join(HERE, SCRIPT), "--ckpt", self.ckpt, "--weights", self.weights,
               "--resume", run.out, "--out", run.out, *config_flags(self.runtime, RuntimeConfig())]
        lcfg = self.settings("", run.steps)
        self.job = FineTune(cmd, run.out, run.out + ".log", steps=run.steps, batch=lcfg.lora_batch_size,
                            session=session)
        return self.job


@dataclasses.dataclass(frozen=True)
class StoppedRun:
    name: str
    out: str
    step: int  # saved at
    steps: int  # asked for
