"""Where and how the code runs: device, precision, TF32, the process group under torchrun, the rank-0 log.

Every script picks these once, through the same three flags (config.RuntimeConfig) and functions:

    cli.add_runtime_args(parser)                     # --device, --precision, --seed: one declaration
    rcfg = cli.runtime_from_args(args)               # checked against config.DEVICES, PRECISIONS, SEED_MAX
    device = pick_device(rcfg.device)                # auto: cuda, then mps, then cpu
    check_precision(rcfg.precision, device)          # at start-up: fp16 on a CPU fails before any work
    precision = resolve_precision(rcfg.precision, device, probe)  # once: on CUDA, auto times probe(p), picks
    with autocast(device, precision): ...            # mixed precision for the forward pass only

    dist_info, device = setup_distributed("auto")    # under torchrun: join the group (nccl or gloo)
    fwd_model = wrap_ddp(model, dist_info, device)   # DistributedDataParallel when world > 1
    cleanup_distributed(ok)                          # leave the group, all ranks together
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import statistics
import time

import torch
import torch.distributed as dist

from config import PRECISIONS  # the allowed values, declared once beside config.RuntimeConfig
from errors import CLIError
from files import release_locks


# ------------------------------------------------------------ device, precision

def _mps_available():
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name="auto"):
    """auto tries cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not _mps_available():
        raise CLIError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16():
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow.

    ``ONEDNN_MAX_CPU_ISA`` below AVX512 (the README's laptop emulation, ``=AVX2``) hides that hardware
    from oneDNN, so bf16 would be emulated there too: it counts as absent."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not (isa.startswith("AVX512") or isa.startswith("AVX10") or isa == "ALL"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no cheap way to tell, so stay in fp32
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_precision(precision, device):
    """At start-up, before any work: a precision this device cannot run is an error."""
    if precision not in PRECISIONS:
        raise CLIError(f"unknown precision {precision!r}: precision must be one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise CLIError("--precision fp16 is for GPUs; on a CPU use bf16 or fp32")


def resolve_precision(precision, device, probe=None, log=None, dist_info=None):
    """The precision a script runs in, decided here and only here, once per script.

    An explicit choice is checked (check_precision) and kept. auto: bf16 on CPUs with bf16 hardware,
    fp32 on other CPUs; on CUDA the faster of bf16 and fp32 for a training step. Autocast is not always
    the faster choice there: a small model's step is bound by kernel launches, and autocast adds a cast
    kernel per weight per step (experiments/performance/notes.md, "autocast on a GPU"). So the training
    scripts (train, lora_finetune, bench) pass ``probe`` (a callable running one training step, forward
    and backward, in the precision it is passed), and auto times it in both and
    picks the faster (``fastest_precision``); without one (sampling) it is bf16 (fp16 where the GPU lacks
    bf16), so the same seed gives the same pictures. Under torchrun every rank times, rank 0 decides."""
    check_precision(precision, device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        low = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if probe is None:
            return low
        best = fastest_precision(probe, (low, "fp32"), device, log=log)
        return best if dist_info is None else broadcast_object(best, dist_info)
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def wall_time(fn, device):
    """Seconds one call of ``fn`` takes, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def fastest_precision(probe, candidates, device, warmup=2, repeats=3, timer=None, log=None):
    """The candidate whose ``probe(precision)`` runs fastest: ``warmup`` untimed calls of each (cuDNN and
    cuBLAS pick their kernels then), then ``repeats`` rounds that take turns; the lowest median wins, the
    first candidate on a tie. The global RNG is restored afterwards, so a run's random stream does not
    depend on the probe. ``timer(fn, device)`` returns the seconds of one call (replaced in tests)."""
    timer = timer or wall_time
    times = {c: [] for c in candidates}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for c in candidates:
            for _ in range(warmup):
                probe(c)
        for _ in range(repeats):
            for c in candidates:
                times[c].append(timer(lambda c=c: probe(c), device))
    medians = {c: statistics.median(ts) for c, ts in times.items()}
    best = min(candidates, key=lambda c: (medians[c], candidates.index(c)))
    if log is not None:
        log("precision auto: " + ", ".join(f"{c} {1e3 * m:.1f} ms" for c, m in medians.items())
            + f" per step (median of {repeats}) -> {best}")
    return best


def autocast(device, precision):
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_tf32(device):
    """TF32 matmuls and convolutions on Ampere and later (fp32 range, 10-bit mantissa): fp32 runs at tensor-core speed."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ------------------------------------------------------------------ distributed

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def wrap_ddp(model, dist_info, device, frozen_ignored=False):
    """DistributedDataParallel around ``model`` when there are several processes, else ``model`` itself.

    ``frozen_ignored``: DDP skips the parameters that do not require grad (a LoRA fine-tune's frozen
    base): no start-up broadcast of them, no buckets; every rank loaded the same file."""
    if dist_info.world == 1:
        return model
    if frozen_ignored:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def end_run(ok=True):
    """The last thing a training script does, however it ends: drop its output's lock (files.lock_output), then
    leave the process group."""
    release_locks()
    cleanup_distributed(ok)


def cleanup_distributed(ok=True):
    """Leave the process group, all ranks together.

    After the last step rank 0 still writes the checkpoint and the sample grid while the other
    ranks are done. A rank that tore gloo down and exited in that window was seen to abort
    ("terminate called without an active exception", SIGABRT) and take the run down with it, so
    on success every rank first waits at a barrier for rank 0. The DDP wrapper's reducer holds
    the process group too: collect it now, while the interpreter is whole, not at exit. On the
    error path there is no barrier, since a rank that died would leave the others waiting."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_mean(tensor, dist_info):
    """The mean over ranks (gloo has no AVG: SUM, then divide); the tensor itself with one process."""
    if dist_info.world == 1:
        return tensor
    dist.all_reduce(tensor)
    return tensor / dist_info.world


def broadcast_object(obj, dist_info):
    """Rank 0's ``obj`` on every rank."""
    if dist_info.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_rank_batch(batch_size, scope, world):
    """(per-rank batch, global batch) for ``--batch-scope global|per-rank``."""
    if scope == "per-rank":
        return batch_size, batch_size * world
    if batch_size % world:
        raise CLIError(f"global batch {batch_size} does not split over {world} processes; "
                       f"pass a multiple of {world} or --batch-scope per-rank")
    return batch_size // world, batch_size


def rank0_logger(dist_info):
    """print on rank 0, nothing on the others: one copy of every message under torchrun."""
    return print if dist_info.main else (lambda *a, **k: None)
