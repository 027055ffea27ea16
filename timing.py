"""How bench.py measures a machine: what it is, its peak memory, medians of timed rounds, its matmul peak,
the FLOPs of a training step and the profiler's top ops.

    timings = measure({"a": fn_a, "b": fn_b}, device, repeats=5, warmup=1, min_time=0.2)
    timings["a"].median_s, timings["a"].mem()              # seconds per call; peak memory of a warm-up call
    peak_from(measure(matmul_fns(device, n, matmul_kinds(device, "bf16")), ...), n)   # GFLOP/s per kind

The variants being compared are timed in turn, round after round, so the drift of a shared machine
hits all of them alike; a round repeats a call until it lasts ``min_time``. On CUDA each round is
timed with CUDA events, the GPU's own clock.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import time

import torch

from runtime import cpu_has_fast_bf16

MB = 2 ** 20

# ------------------------------------------------------------ machine, memory

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine_info(device):
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        available = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_hardware": cpu_has_fast_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _proc_status_bytes(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:  # not Linux
        pass
    return None


def reset_peak_memory(device):
    """Start a new peak; returns the memory in use now (bytes)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM (the peak RSS) to the current RSS
    except OSError:  # not Linux, or not allowed: the peak stays that of the whole process
        pass
    return _proc_status_bytes("VmRSS") or 0


def peak_memory(device):
    """Peak since reset_peak_memory (bytes): max_memory_allocated on CUDA, peak RSS elsewhere."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # Unix without /proc: ru_maxrss is the lifetime peak (kB on Linux, bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_kind(device):
    return "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"


# --------------------------------------------------------------------- timing

@dataclasses.dataclass
class Timing:
    median_s: float  # per call
    runs_s: list  # per call, one value per timed round
    number: int  # calls per timed round
    warmup_s: list  # each warm-up call (the first holds one-time costs: allocation, compilation)
    mem_start: int  # bytes in use before the last warm-up call
    mem_peak: int  # peak bytes during it

    def mem(self, prefix=""):
        return {prefix + "mem_peak_mb": round(self.mem_peak / MB, 1),
                prefix + "mem_delta_mb": round((self.mem_peak - self.mem_start) / MB, 1)}


def _time_calls(fn, number, device):
    """Seconds that ``number`` calls of ``fn`` take, the device's queued work included.

    On CUDA the time between two events recorded on the stream around the calls: the GPU's own
    clock, without the host's synchronisation latency at the two ends."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync(device)
    return time.perf_counter() - start


def measure(fns, device, repeats, warmup, min_time):
    """Time each callable of ``fns`` ({name: fn}); returns {name: Timing}.

    Each gets ``warmup`` untimed calls (the peak memory of the last one is recorded), then
    ``repeats`` rounds call every fn in turn, so a slow spell of a shared machine does not
    land on one variant only. A round calls fn ``number`` times, enough to last ``min_time``."""
    warm, number, mem = {}, {}, {}
    for name, fn in fns.items():
        warm[name] = []
        for _ in range(warmup):
            start = reset_peak_memory(device)
            warm[name].append(_time_calls(fn, 1, device))
            mem[name] = (start, peak_memory(device))
        number[name] = max(1, math.ceil(min_time / max(warm[name][-1], 1e-9)))
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(_time_calls(fn, number[name], device) / number[name])
    return {name: Timing(statistics.median(runs[name]), runs[name], number[name], warm[name], *mem[name])
            for name in fns}


def ms(seconds):
    return round(seconds * 1e3, 4)


# ----------------------------------------------------------------------- peak

PEAK_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_matmul_size(device):
    """n of the peak's n x n products: large enough on a GPU for the product to outlast its launch by far."""
    return 8192 if device.type == "cuda" else 2048


def peak_key(precision, device):
    """Which matmul peak a training precision is held against: fp32 on CUDA runs as TF32 (train.py allows it)."""
    return "tf32" if precision == "fp32" and device.type == "cuda" else precision


def matmul_kinds(device, precision):
    kinds = ["fp32"]
    if device.type == "cuda":
        kinds.append("tf32")
    has_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    if has_bf16 or precision == "bf16":
        kinds.append("bf16")
    if device.type == "cuda" and precision == "fp16":
        kinds.append("fp16")
    return kinds


def matmul_fns(device, n, kinds):
    """{"matmul_<kind>": fn}: an n x n by n x n matmul (2 n^3 FLOPs) per kind, into a preallocated output."""
    fns = {}
    for kind in kinds:
        dtype = PEAK_DTYPES[kind]
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        fns[f"matmul_{kind}"] = (lambda a=a, b=b, out=out, kind=kind: _mm(a, b, out, kind, device))
    return fns


def peak_from(timings, n):
    """GFLOP/s of each matmul_<kind> timing: the machine's practical peak for that kind."""
    return {f"{name[len('matmul_'):]}_gflops": round(2 * n ** 3 / t.median_s / 1e9, 2)
            for name, t in timings.items() if name.startswith("matmul_")}


def _mm(a, b, out, kind, device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    torch.mm(a, b, out=out)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py sets it


# ---------------------------------------------------------------------- FLOPs

def count_train_flops(model, diffusion, batch):
    """FLOPs of one forward+backward of the training loss (matmuls, convolutions, attention).

    On the CPU the UNet's attention is plain matmuls (see unet.Attention), which the counter sees;
    on CUDA it counts the fused attention kernels itself."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        diffusion.loss(model, *batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# -------------------------------------------------------------------- profile

def profile_step(step, device, num_steps=3, top=15):
    """torch.profiler over a few training steps: the top ops by self CPU time (by self GPU time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(num_steps):
            step()
        sync(device)
    events = prof.key_averages()
    total_cpu = sum(e.self_cpu_time_total for e in events) or 1
    total_dev = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    rows = []
    on_gpu = device.type == "cuda"
    by = (lambda e: getattr(e, "self_device_time_total", 0)) if on_gpu else (lambda e: e.self_cpu_time_total)
    for e in sorted(events, key=by, reverse=True)[:top]:
        row = {"op": e.key, "calls_per_step": round(e.count / num_steps, 1),
               "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / num_steps, 3),
               "self_cpu_share": round(e.self_cpu_time_total / total_cpu, 4)}
        if on_gpu:
            dev = getattr(e, "self_device_time_total", 0)
            row.update(self_device_ms_per_step=round(dev / 1e3 / num_steps, 3),
                       self_device_share=round(dev / total_dev, 4))
        rows.append(row)
    return {"steps": num_steps, "sorted_by": "self_device_time" if on_gpu else "self_cpu_time",
            "total_self_cpu_ms_per_step": round(total_cpu / 1e3 / num_steps, 2),
            "total_self_device_ms_per_step": round(total_dev / 1e3 / num_steps, 2) if on_gpu else None, "top": rows}
