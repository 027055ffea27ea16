"""Measure, on this machine, its matmul peak and the project's training, LoRA, inference and sampling speed.

    python bench.py                                # fast preset, --device auto: a Markdown table + out/bench.json
    python bench.py --device cuda --preset tutorial
    python bench.py --preset tiny --repeats 1      # smoke run, seconds
    python bench.py --compile                      # also time a torch.compile'd step (compiling: minutes on a CPU)
    python bench.py --profile                      # also list the training step's top ops by self time
    python bench.py --preset tutorial --sections train   # the matmul peak and the training step only
    OMP_NUM_THREADS=1 taskset -c 1 python bench.py # one pinned core (what the 'cores' in the header shows)

Every figure comes from this run: the median of --repeats timed rounds after --warmup untimed
calls, every ratio from this run's own medians (the variants being compared are timed in turn,
round after round, so the drift of a shared machine hits all of them alike). A round repeats a
call until it lasts --min-time, so short calls (a forward pass on a GPU) are timed reliably.

    peak       square matmuls (--matmul-size: 8192 on CUDA, 2048 elsewhere): fp32, and bf16 where
               the hardware has it (tf32 on CUDA, fp16 when that is the precision used); GFLOP/s =
               2 n^3 / time. Timed in the same rounds as the training steps, so their fraction of
               peak holds on a busy machine. On CUDA every call is timed with CUDA events after at
               least two warm-up calls: a 2048^3 bf16 product lasts tens of microseconds on an H100,
               so the first call's one-time costs and the host's launch latency swamped it (bf16
               then measured slower than tf32); 8192^3 lasts milliseconds
    train      one optimizer step as train.py runs it: trainer.fit's data part, then the step fit
               calls (trainer.make_train_step, with the EMA update as its after_step hook),
               in the precision train.py picks (resolve_precision('auto')) and in fp32; FLOPs of
               one forward+backward counted by torch.utils.flop_counter.FlopCounterMode; data wait
               = indexing the in-memory batch + drawing t, noise and label drop, over the whole step
    lora       LoRA fine-tune step and AdamW state (exp_avg + exp_avg_sq bytes) vs a full
               fine-tune of the same model on the same batch
    inference  one forward pass: base, LoRA unmerged (non-zero lora_b), LoRA merged
    sampling   time per sample through Diffusion.sample: DDPM with all T steps (--ddpm-steps of
               them timed, the sampler stopped there by its callback, and the rest extrapolated per
               step when T is larger), DDIM-50 and DDIM-20, with and without classifier-free guidance
    memory     per variant, during its last warm-up call: peak process RSS on CPU (VmHWM, reset
               through /proc/self/clear_refs; it includes memory the allocator kept from earlier
               sections, so the increase over the start is given too), max_memory_allocated on CUDA

The targets in the table are reported as measured, pass or fail.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from files import check_replace, check_writable_file, remove_stale_temps, write_json
from config import (BATCH_MAX, DEFAULT_DATA_DIR, DEFAULT_OUT_DIR, DiffusionConfig, LoraConfig, ModelConfig,
                    SampleConfig, TrainConfig, preset_config)
from cli import ArgumentParser, add_preset_arg, add_runtime_args, bounded, path_arg, runtime_from_args
from errors import CLIError, run_main
from dataset import DATASETS, load_dataset, to_model_range
from diffusion import Diffusion, generate
from lora import add_lora, lora_layers, mark_only_lora_as_trainable, merge_lora
from runtime import (Dist, autocast, check_precision, cpu_has_fast_bf16, enable_tf32, pick_device,
                     resolve_precision)
from trainer import (LORA_GRAD_CLIP, TrainData, ema_update, epoch_batches, make_optimizer, make_train_step,
                     precision_probe)
from unet import UNet, count_parameters

BENCH_VERSION = 1
MB = 2 ** 20

# (name, what it measures, comparison, threshold): the targets, reported, never enforced
TARGETS = (
    ("train_fp32_peak_fraction", "training GFLOP/s / fp32 matmul peak", ">=", 0.50),
    ("lora_step_ratio", "LoRA step / full fine-tune step", "<=", 0.75),
    ("lora_opt_state_ratio", "LoRA AdamW state / full fine-tune's", "<=", 0.05),
    ("merged_over_base", "merged LoRA forward / base forward", "<=", 1.02),
    ("unmerged_over_base", "unmerged LoRA forward / base forward", "<=", 1.10),
    ("ddpm_over_ddim50", "DDPM-T / DDIM-50 time per sample (guided)", ">=", 15.0),
    ("data_wait_share", "data wait / training step", "<", 0.05),
)


# ------------------------------------------------------------------ arguments

SECTIONS = ("train", "lora", "inference", "sampling")  # train includes the matmul peak it is held against


def _sections(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(SECTIONS)}, got {text!r}")
    return [n for n in SECTIONS if n in names]


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_preset_arg(p)
    timing, sampling, data, out = p.group("timing"), p.group("sampling"), p.group("data"), p.group("output")
    timing.add_argument("--repeats", type=bounded(int, ge=1, le=1000), default=5,
                        help="timed rounds; medians are reported")
    timing.add_argument("--warmup", type=bounded(int, ge=1, le=1000), default=1,
                        help="untimed calls of each variant first")
    timing.add_argument("--min-time", type=bounded(float, ge=0.0, le=3600.0), default=0.2,
                        help="seconds a timed round lasts at least (short calls are repeated within it)")
    # three n x n fp32 matrices: 16384 is 3 GB, more than a GPU's peak needs
    timing.add_argument("--matmul-size", type=bounded(int, ge=16, le=16384), default=None,
                        help="n of the n x n matmuls for the peak (default: 8192 on CUDA, 2048 elsewhere)")
    sampling.add_argument("--infer-batch", type=bounded(int, ge=1, le=BATCH_MAX), default=None,
                          help="batch of the inference forward (default 2 x --sample-batch: one guided sampling step)")
    sampling.add_argument("--sample-batch", type=bounded(int, ge=1, le=BATCH_MAX), default=10,
                          help="images per sampling run")
    sampling.add_argument("--ddpm-steps", type=bounded(int, ge=0, le=100000), default=100,
                          help="DDPM steps timed, then extrapolated to the model's T (0: all T)")
    data.add_argument("--dataset", default=None, choices=DATASETS,
                      help="default: the preset's; never downloads (auto uses mnist if on disk, else mnist-5k)")
    data.add_argument("--data-dir", default=DEFAULT_DATA_DIR, type=path_arg, help="where torchvision keeps MNIST")
    timing.add_argument("--sections", type=_sections, default=list(SECTIONS),
                        help="what to measure, comma-separated: train (with the matmul peak), lora, inference, "
                        "sampling")
    timing.add_argument("--compile", action="store_true",
                        help="also time a torch.compile'd training step (used for the target only if faster)")
    timing.add_argument("--profile", action="store_true",
                        help="also profile the training step with torch.profiler and list its top ops by self time")
    # --precision: of training (also timed in fp32), LoRA, inference and sampling; auto decides as train.py does
    add_runtime_args(p)
    out.add_argument("--out", default=os.path.join(DEFAULT_OUT_DIR, "bench.json"), type=path_arg,
                     help="where the JSON goes")
    out.add_argument("--overwrite", action="store_true", help="replace an earlier bench.py JSON at --out")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


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


# ------------------------------------------------------------------- training

def make_data_fn(data, device, timesteps):
    """trainer.fit's data part for ``data`` (a TrainData): index the in-memory set, draw t, noise and label drop."""
    batches = epoch_batches(len(data.labels), data.global_batch, 0, data.seed, Dist())
    count = [0]

    def batch():
        idx = batches[count[0] % len(batches)]
        count[0] += 1
        return data.batch(idx, timesteps, device)
    return batch


def make_step(fwd_model, opt, diffusion, data_fn, *, lr, grad_clip, device, precision, after_step=None):
    """One step of trainer.fit: its data part (``data_fn``), then trainer.make_train_step's step, the one
    fit calls (at a constant learning rate ``lr``); returns (step, data_seconds).

    Each call appends the time of its data part to data_seconds."""
    train_step = make_train_step(fwd_model, opt, diffusion, lr_fn=lambda s: lr, grad_clip=grad_clip, device=device,
                                 precision=precision, after_step=after_step)
    data_s = []
    count = [0]

    def step():
        start = time.perf_counter()
        batch = data_fn()
        sync(device)
        data_s.append(time.perf_counter() - start)
        loss = train_step(batch, count[0])
        count[0] += 1
        loss.item()  # trainer.fit reads the loss every step (a device sync on GPUs)
    return step, data_s


def bench_train(model, diffusion, data_fn, tcfg, device, precision, args):
    """The matmul peak, and the training step in ``precision`` and in fp32 (and compiled, with --compile).

    The steps share one model and optimizer. The matmuls are timed in the same rounds as the
    steps, so the fraction of peak holds even when the machine is busy with other work for a
    while. Returns (peak, train results, the headline step function)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model.parameters(), tcfg.lr, tcfg.weight_decay, device)
    model.train()

    def after(n):
        ema_update(ema, model, tcfg.ema_decay, n)

    variants = {precision: (model, precision)}
    variants.setdefault("fp32", (model, "fp32"))
    if args.compile:
        variants[precision + "+compile"] = (torch.compile(model), precision)
    steps, data_lists = {}, {}
    for name, (fwd, prec) in variants.items():
        steps[name], data_lists[name] = make_step(fwd, opt, diffusion, data_fn, lr=tcfg.lr, grad_clip=tcfg.grad_clip,
                                                  device=device, precision=prec, after_step=after)
    flops = count_train_flops(model, diffusion, data_fn())
    # a compiled step may recompile once; on CUDA the first call also loads cuBLAS kernels, and the
    # calls per round are sized from the last warm-up call
    warmup = max(args.warmup, 2) if args.compile or device.type == "cuda" else args.warmup
    mm = matmul_fns(device, args.matmul_size, matmul_kinds(device, precision))
    timings = measure({**mm, **steps}, device, args.repeats, warmup, args.min_time)
    del mm
    peak = {"matmul_size": args.matmul_size, **{f"{k}_gflops": None for k in PEAK_DTYPES},
            **peak_from(timings, args.matmul_size)}
    runs = {}
    for name, (_, prec) in variants.items():
        tm = timings[name]
        data_med = statistics.median(data_lists[name][-args.repeats * tm.number:])
        achieved = flops / tm.median_s / 1e9
        key = peak_key(prec, device)
        runs[name] = {
            "precision": prec,
            "compiled": name.endswith("+compile"),
            "step_ms": ms(tm.median_s),
            "images_per_s": round(tcfg.batch_size / tm.median_s, 2),
            "achieved_gflops": round(achieved, 4),  # 4 places: a tiny model on a slow core is ~1 GFLOP/s
            "peak_key": key,
            "peak_fraction": round(achieved / peak[f"{key}_gflops"], 4),
            "fp32_peak_fraction": round(achieved / peak["fp32_gflops"], 4),
            "data_ms": ms(data_med),
            "data_wait_share": round(data_med / tm.median_s, 5),
            "first_call_s": round(tm.warmup_s[0], 3),
            **tm.mem(),
        }
    headline, compile_info = precision, None
    if args.compile:
        eager, comp = timings[precision].median_s, timings[precision + "+compile"].median_s
        kept = comp < eager
        headline = precision + "+compile" if kept else precision
        compile_info = {"eager_step_ms": ms(eager), "compiled_step_ms": ms(comp), "speedup": round(eager / comp, 4),
                        "kept": kept, "first_call_s": round(timings[precision + "+compile"].warmup_s[0], 2)}
    train = {"batch_size": tcfg.batch_size, "flops_per_step": int(flops),
             "flops_counted": "one forward+backward of the loss (FlopCounterMode: matmuls, convolutions, attention)",
             "step_includes": "data, forward, backward, grad clip, AdamW, EMA update, loss.item()",
             "precision_used": precision, "headline": headline, "runs": runs, "compile": compile_info}
    return peak, train, steps[headline]


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


# ----------------------------------------------------------------------- LoRA

def optimizer_state_bytes(opt):
    """Bytes of AdamW's moment estimates (exp_avg, exp_avg_sq) over all parameters."""
    return sum(v.numel() * v.element_size() for state in opt.state.values() for k, v in state.items()
               if k in ("exp_avg", "exp_avg_sq"))


def bench_lora(base, diffusion, batch, lcfg, device, precision, args):
    """LoRA fine-tune vs full fine-tune of the same model on the same batch, as lora_finetune.py steps them."""
    full = copy.deepcopy(base).train().requires_grad_(True)
    lora = copy.deepcopy(base).train()
    add_lora(lora, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.lora_dropout)
    trainable, total = mark_only_lora_as_trainable(lora)
    opts = {"lora": make_optimizer(lora.parameters(), lcfg.lora_lr, 0.0, device),
            "full": make_optimizer(full.parameters(), lcfg.lora_lr, 0.0, device)}

    def fixed():
        return batch
    steps = {k: make_step(m, opts[k], diffusion, fixed, lr=lcfg.lora_lr, grad_clip=LORA_GRAD_CLIP, device=device,
                          precision=precision)[0]
             for k, m in (("lora", lora), ("full", full))}
    tm = measure(steps, device, args.repeats, args.warmup, args.min_time)
    state = {k: optimizer_state_bytes(o) for k, o in opts.items()}
    return {"precision": precision, "batch_size": len(batch[1]), "r": lcfg.r, "alpha": lcfg.alpha,
            "targets": list(lcfg.targets), "trainable_params": trainable, "total_params": total,
            "step_ms": ms(tm["lora"].median_s), "full_step_ms": ms(tm["full"].median_s),
            "step_ratio": round(tm["lora"].median_s / tm["full"].median_s, 4),
            "opt_state_bytes": state["lora"], "full_opt_state_bytes": state["full"],
            "opt_state_ratio": round(state["lora"] / state["full"], 6),
            **tm["lora"].mem(), **tm["full"].mem("full_")}


# ------------------------------------------------------------------ inference

def lora_models(base, lcfg, seed):
    """(unmerged, merged) copies of ``base`` with one LoRA adapter whose lora_b is non-zero."""
    unmerged = copy.deepcopy(base)
    add_lora(unmerged, lcfg.targets, lcfg.r, lcfg.alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unmerged).values():
            # B starts at zero (a no-op); a trained adapter is not, and its cost must show
            for b in layer.lora_B.values():
                b.weight.copy_(0.02 * torch.randn(b.weight.shape, generator=g))
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    return unmerged.eval(), merged.eval()


def bench_inference(models, inputs, device, precision, args):
    """One forward pass of each model on the same batch, no_grad, in ``precision``."""
    def forward(m):
        with torch.no_grad(), autocast(device, precision):
            m(*inputs)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the check is in true fp32: TF32 alone differs by ~1e-3
    with torch.no_grad():  # the merged weights must give the unmerged output
        diff = (models["merged"](*inputs) - models["unmerged"](*inputs)).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    tm = measure({k: (lambda m=m: forward(m)) for k, m in models.items()}, device, args.repeats, args.warmup,
                 args.min_time)
    out = {"precision": precision, "batch_size": len(inputs[0]),
           "base_ms": ms(tm["base"].median_s), "unmerged_ms": ms(tm["unmerged"].median_s),
           "merged_ms": ms(tm["merged"].median_s),
           "unmerged_over_base": round(tm["unmerged"].median_s / tm["base"].median_s, 4),
           "merged_over_base": round(tm["merged"].median_s / tm["base"].median_s, 4),
           "merged_max_abs_diff": diff}
    for k in models:
        out.update(tm[k].mem(f"{k}_"))
    return out


# ------------------------------------------------------------------- sampling

def bench_sampling(model, diffusion, scfg, device, precision, args):
    """Time per sample of DDPM (all T steps), DDIM-50, DDIM-20 and DPM-Solver++(2M)-10, guided (w =
    SampleConfig.guidance) and not."""
    model.eval()
    T = diffusion.timesteps
    labels = (torch.arange(args.sample_batch) % model.num_classes).to(device)
    ddpm_timed = T if args.ddpm_steps == 0 else min(args.ddpm_steps, T)
    samplers = {"ddpm": ("ddpm", T, ddpm_timed), "ddim50": ("ddim", min(50, T), None),
                "ddim20": ("ddim", min(20, T), None), "dpmpp-2m10": ("dpmpp-2m", min(10, T), None)}
    guidance = {"guided": scfg.guidance, "unguided": 0.0}

    def run(sampler, steps, timed, w):
        cfg = SampleConfig(sampler=sampler, steps=steps, eta=0.0, guidance=w)
        num_steps = timed if sampler == "ddpm" and timed < T else None
        return lambda: sample_steps(model, diffusion, labels, device, precision, cfg, seed=args.seed,
                                    num_steps=num_steps)

    fns = {(name, g): run(*spec, w) for name, spec in samplers.items() for g, w in guidance.items()}
    tm = measure(fns, device, args.repeats, args.warmup, args.min_time)
    runs = {}
    for name, (sampler, steps, timed) in samplers.items():
        scale = T / timed if timed else 1.0  # extrapolate the timed DDPM steps to all T
        runs[name] = {"sampler": sampler, "steps": steps, "steps_timed": timed or steps,
                      "extrapolated": bool(timed and timed < T)}
        for g in guidance:
            runs[name][f"{g}_ms_per_sample"] = ms(tm[(name, g)].median_s * scale / args.sample_batch)
            runs[name].update(tm[(name, g)].mem(f"{g}_"))
    ratio = {g: (tm[("ddpm", g)].median_s * T / ddpm_timed) / tm[("ddim50", g)].median_s for g in guidance}
    return {"precision": precision, "batch_size": args.sample_batch, "guidance": scfg.guidance, "T": T,
            "runs": runs, "ddpm_over_ddim50_guided": round(ratio["guided"], 3),
            "ddpm_over_ddim50_unguided": round(ratio["unguided"], 3)}


class _StepsDone(Exception):
    """Raised by sample_steps' callback once the steps being timed have run."""


def sample_steps(model, diffusion, labels, device, precision, cfg, *, seed, num_steps=None):
    """A sampling run through diffusion.generate (so Diffusion.sample, the one sampler): all of it, or its
    first ``num_steps`` steps only (from t = T-1 down; the per-step callback stops it there)."""
    def stop(step_index, total, x0_estimate):
        if step_index + 1 >= num_steps:
            raise _StepsDone
    try:
        generate(model, diffusion, labels, device, precision, cfg, seed=seed,
                 callback=stop if num_steps is not None else None)
    except _StepsDone:
        pass


# -------------------------------------------------------------------- targets

def evaluate_targets(res):
    """Every target whose section ran, with its value, pass or fail."""
    values = {}
    if "train" in res:
        head = res["train"]["runs"][res["train"]["headline"]]
        values.update(train_fp32_peak_fraction=head["fp32_peak_fraction"], data_wait_share=head["data_wait_share"])
    if "lora" in res:
        values.update(lora_step_ratio=res["lora"]["step_ratio"], lora_opt_state_ratio=res["lora"]["opt_state_ratio"])
    if "inference" in res:
        values.update(merged_over_base=res["inference"]["merged_over_base"],
                      unmerged_over_base=res["inference"]["unmerged_over_base"])
    if "sampling" in res:
        values.update(ddpm_over_ddim50=res["sampling"]["ddpm_over_ddim50_guided"])
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
    return [{"name": name, "what": what, "value": values[name], "op": op, "threshold": thr,
             "pass": bool(ops[op](values[name], thr))} for name, what, op, thr in TARGETS if name in values]


# ---------------------------------------------------------------------- table

def _fmt_ms(v):
    return f"{v:.3g} ms" if v < 10 else f"{v:,.0f} ms" if v >= 1000 else f"{v:.1f} ms"


def _fmt_bytes(n):
    return f"{n / MB:.2f} MB" if n >= 0.1 * MB else f"{n / 1024:.1f} KB"


def markdown_table(res):
    m, c = res["machine"], res["config"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    lines = [
        f"### bench.py: preset {c['preset']}, device {m['device']}{gpu}",
        "",
        f"CPU {m['cpu']}; torch uses {m['torch_threads']} thread(s) of {m['cpus_available']} available "
        f"core(s) ({m['cpu_count']} in the machine); bf16 hardware: {'yes' if m['cpu_bf16_hardware'] else 'no'}; "
        f"torch {m['torch']}, Python {m['python']}. Medians of {c['repeats']} rounds after {c['warmup']} warm-up "
        f"call(s); {c['parameters'] / 1e6:.2f}M parameters; memory = {res['memory_kind']}.",
        "",
        "| what | median | derived | peak memory | target | met |",
        "|---|---:|---|---:|---|:---:|",
    ]
    targets = {t["name"]: t for t in res["targets"]}

    def row(what, median, derived="", mem="", target=None):
        t = targets.get(target)
        goal = f"{t['op']} {t['threshold']:g}" if t else ""
        met = ("PASS" if t["pass"] else "FAIL") if t else ""
        lines.append(f"| {what} | {median} | {derived} | {mem} | {goal} | {met} |")

    def mem(d, prefix=""):
        return f"{d[prefix + 'mem_peak_mb']:,.0f} MB (+{d[prefix + 'mem_delta_mb']:,.0f})"

    if "train" in res:
        pk = res["peak"]
        n = pk["matmul_size"]
        for kind in ("fp32", "tf32", "bf16", "fp16"):
            if pk.get(f"{kind}_gflops") is not None:
                row(f"matmul {kind} {n}x{n}", "", f"{pk[f'{kind}_gflops']:,.1f} GFLOP/s")
        tr = res["train"]
        for name, r in tr["runs"].items():
            label = f"train step {name}" + (" (auto)" if name == tr["precision_used"] else "")
            head = name == tr["headline"]
            row(label, _fmt_ms(r["step_ms"]),
                f"{r['images_per_s']:,.1f} img/s, {r['achieved_gflops']:,.1f} GFLOP/s = "
                f"{100 * r['peak_fraction']:.1f}% of {r['peak_key']} peak, "
                f"{100 * r['fp32_peak_fraction']:.1f}% of fp32 peak",
                mem(r), "train_fp32_peak_fraction" if head else None)
            row(f"  data wait ({name})", _fmt_ms(r["data_ms"]), f"{100 * r['data_wait_share']:.2f}% of the step", "",
                "data_wait_share" if head else None)
        if tr["compile"]:
            cp = tr["compile"]
            row("  torch.compile", "", f"{cp['speedup']:.2f}x eager ({'kept' if cp['kept'] else 'not kept'}; "
                f"first call {cp['first_call_s']:.0f} s)")
    if "lora" in res:
        lo = res["lora"]
        row(f"full fine-tune step ({lo['precision']})", _fmt_ms(lo["full_step_ms"]), "", mem(lo, "full_"))
        row(f"LoRA fine-tune step (r={lo['r']}, {','.join(lo['targets'])})", _fmt_ms(lo["step_ms"]),
            f"{lo['step_ratio']:.2f}x full", mem(lo), "lora_step_ratio")
        row("LoRA AdamW state", _fmt_bytes(lo["opt_state_bytes"]),
            f"{100 * lo['opt_state_ratio']:.2f}% of full ({_fmt_bytes(lo['full_opt_state_bytes'])}); "
            f"{lo['trainable_params']:,} of {lo['total_params']:,} parameters trained", "", "lora_opt_state_ratio")
    if "inference" in res:
        inf = res["inference"]
        row(f"forward base (batch {inf['batch_size']}, {inf['precision']})", _fmt_ms(inf["base_ms"]), "",
            mem(inf, "base_"))
        row("forward LoRA unmerged", _fmt_ms(inf["unmerged_ms"]), f"{inf['unmerged_over_base']:.3f}x base",
            mem(inf, "unmerged_"), "unmerged_over_base")
        row("forward LoRA merged", _fmt_ms(inf["merged_ms"]),
            f"{inf['merged_over_base']:.3f}x base (max |merged - unmerged| {inf['merged_max_abs_diff']:.1e})",
            mem(inf, "merged_"), "merged_over_base")
    if "sampling" in res:
        sa = res["sampling"]
        for name, r in sa["runs"].items():
            for g, w in (("guided", sa["guidance"]), ("unguided", 0.0)):
                label = f"sample {r['sampler'].upper()}-{r['steps']}, w={w:g}"
                derived = f"per sample, batch {sa['batch_size']}, {sa['precision']}"
                if r["extrapolated"]:
                    derived += f"; {r['steps_timed']} of {r['steps']} steps timed, extrapolated"
                target = None
                if name == "ddim50":
                    derived += f"; DDPM-{sa['T']} / this = {sa[f'ddpm_over_ddim50_{g}']:.1f}x"
                    target = "ddpm_over_ddim50" if g == "guided" else None
                row(label, _fmt_ms(r[f"{g}_ms_per_sample"]), derived, mem(r, f"{g}_"), target)
    passed = sum(t["pass"] for t in res["targets"])
    lines += ["", f"{passed} of {len(res['targets'])} targets met; total {res['total_s']:.0f} s."]
    if res.get("profile"):
        pr = res["profile"]
        gpu = pr["sorted_by"] == "self_device_time"
        total = pr["total_self_device_ms_per_step"] if gpu else pr["total_self_cpu_ms_per_step"]
        lines += ["", f"Top ops of the training step ({res['train']['headline']}, torch.profiler) by self "
                  f"{'GPU' if gpu else 'CPU'} time, {total:,.1f} ms per step in all:", "",
                  "| op | calls/step | self CPU ms/step | CPU share |"
                  + (" self GPU ms/step | GPU share |" if gpu else ""),
                  "|---|---:|---:|---:|" + ("---:|---:|" if gpu else "")]
        for r in pr["top"]:
            line = (f"| {r['op'][:80]} | {r['calls_per_step']:g} | {r['self_cpu_ms_per_step']:.2f} | "
                    f"{100 * r['self_cpu_share']:.1f}% |")
            if gpu:
                line += f" {r['self_device_ms_per_step']:.2f} | {100 * r['self_device_share']:.1f}% |"
            lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda args: bench(args, argv), parse_args(argv))


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def is_bench_json(path):
    """Whether ``path`` holds a JSON object this script wrote (its version, machine and table)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"version", "machine", "table"} <= set(obj)


def check_outputs(args):
    """Before any timing: --out is a file path that can be written, and replaces only an earlier bench JSON,
    only with --overwrite (a checkpoint, a folder or another JSON given as --out are left alone)."""
    check_writable_file(args.out, "--out")
    check_replace(args.out, "--out", is_bench_json, args.overwrite, "a bench.py JSON")


def bench(args, argv):
    if (args.compile or args.profile) and "train" not in args.sections:
        raise CLIError(f"--{'compile' if args.compile else 'profile'} times the training step: add train to --sections")
    rcfg = runtime_from_args(args)  # checked; args.seed holds its value from here on
    if rcfg.device == "mps":
        raise CLIError("bench.py measures CPUs and CUDA GPUs (its peaks and memory readings are theirs); "
                       "pass --device cpu")
    check_outputs(args)
    start = time.perf_counter()
    device = pick_device(rcfg.device)
    check_precision(rcfg.precision, device)  # an impossible choice (fp16 on a CPU) fails before any work
    args.matmul_size = args.matmul_size or default_matmul_size(device)
    mcfg = preset_config(ModelConfig, args.preset)
    dcfg = preset_config(DiffusionConfig, args.preset)
    tcfg = preset_config(TrainConfig, args.preset)
    scfg = preset_config(SampleConfig, args.preset)
    lcfg = preset_config(LoraConfig, args.preset)
    enable_tf32(device)  # as train.py
    torch.manual_seed(args.seed)

    data = load_dataset(args.dataset or tcfg.dataset, "train", args.data_dir, download=False, log=lambda *a: None)
    batch = max(tcfg.batch_size, lcfg.lora_batch_size)
    if batch > len(data):
        raise CLIError(f"batch {batch} is larger than the {len(data)} images of {data.name}")
    x_all = to_model_range(data.images, mcfg.img_size).to(device)
    y_all = data.labels.to(device)
    model = UNet(mcfg).to(device)
    diffusion = Diffusion.from_config(dcfg).to(device)

    def train_data(global_batch, label_drop, gen):
        return TrainData(images=x_all, labels=y_all, global_batch=global_batch, seed=args.seed, label_drop=label_drop,
                         null_label=mcfg.num_classes, dist=Dist(), gen=gen)

    # decided once, as train.py decides it: auto on CUDA times this model's training step in both precisions
    probe = precision_probe(model, diffusion, train_data(tcfg.batch_size, 0.0, None), dcfg.timesteps,
                            tcfg.batch_size, device)
    precision = resolve_precision(rcfg.precision, device, probe, log)
    precision_auto = precision if rcfg.precision == "auto" else None  # what auto chose; None when not asked for
    machine = machine_info(device)
    log(f"{machine['cpu']}, {machine['torch_threads']} thread(s), device {device}"
        f"{' (' + machine['gpu'] + ')' if machine['gpu'] else ''}, precision {precision}, preset {args.preset}, "
        f"{count_parameters(model) / 1e6:.2f}M parameters, {data.name}")
    res = {"version": BENCH_VERSION, "argv": argv,
           "machine": machine,
           "config": {"preset": args.preset, "device": str(device), "precision": precision,
                      "precision_auto": precision_auto, "repeats": args.repeats,
                      "warmup": args.warmup, "min_time_s": args.min_time, "seed": args.seed, "dataset": data.name,
                      "parameters": count_parameters(model), "model": dataclasses.asdict(mcfg),
                      "diffusion": dataclasses.asdict(dcfg), "lora": dataclasses.asdict(lcfg),
                      "sections": args.sections},
           "memory_kind": memory_kind(device)}

    gen = torch.Generator().manual_seed(args.seed + 1)
    if "train" in args.sections:
        log(f"matmul peak ({args.matmul_size}x{args.matmul_size}) and training step, batch {tcfg.batch_size}, "
            f"{precision} and fp32{' and compiled' if args.compile else ''}")
        data_fn = make_data_fn(train_data(tcfg.batch_size, tcfg.label_drop, gen), device, dcfg.timesteps)
        base_state = copy.deepcopy(model.state_dict())
        res["peak"], res["train"], head_step = bench_train(model, diffusion, data_fn, tcfg, device, precision, args)
        if args.profile:
            log("profiling the training step")
            res["profile"] = profile_step(head_step, device)
        del head_step
        model.load_state_dict(base_state)  # the later sections start from the same initial weights

    if "lora" in args.sections:
        log(f"LoRA vs full fine-tune, batch {lcfg.lora_batch_size}")
        lora_data = make_data_fn(train_data(lcfg.lora_batch_size, tcfg.label_drop, gen), device, dcfg.timesteps)
        res["lora"] = bench_lora(model, diffusion, lora_data(), lcfg, device, precision, args)

    if "inference" in args.sections:
        infer_batch = args.infer_batch or 2 * args.sample_batch
        log(f"inference forward, batch {infer_batch}")
        model.eval()
        unmerged, merged = lora_models(model, lcfg, args.seed)
        g = torch.Generator().manual_seed(args.seed + 3)
        inputs = (torch.randn(infer_batch, mcfg.in_channels, mcfg.img_size, mcfg.img_size, generator=g).to(device),
                  torch.randint(0, dcfg.timesteps, (infer_batch,), generator=g).to(device),
                  torch.randint(0, mcfg.num_classes + 1, (infer_batch,), generator=g).to(device))
        res["inference"] = bench_inference({"base": model, "unmerged": unmerged, "merged": merged}, inputs, device,
                                           precision, args)
        del unmerged, merged

    if "sampling" in args.sections:
        log(f"sampling, batch {args.sample_batch}, T={dcfg.timesteps}")
        res["sampling"] = bench_sampling(model, diffusion, scfg, device, precision, args)

    res["targets"] = evaluate_targets(res)
    res["total_s"] = round(time.perf_counter() - start, 2)
    table = markdown_table(res)
    res["table"] = table
    remove_stale_temps(os.path.dirname(os.path.abspath(args.out)), log)
    write_json(args.out, res)
    print(table)
    log(f"done in {res['total_s']:.0f} s; JSON in {args.out}")
    return res


if __name__ == "__main__":
    main()
