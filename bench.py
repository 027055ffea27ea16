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
import os
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
from runtime import (Dist, autocast, check_precision, enable_tf32, pick_device,
                     resolve_precision)
from trainer import (LORA_GRAD_CLIP, TrainData, ema_update, epoch_batches, make_optimizer, make_train_step,
                     precision_probe)
from unet import UNet, count_parameters
from bench_report import evaluate_targets, markdown_table
from timing import (PEAK_DTYPES, count_train_flops, default_matmul_size, machine_info, matmul_fns, matmul_kinds,
                    measure, memory_kind, ms, peak_from, peak_key, profile_step, sync)

BENCH_VERSION = 1


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
    """Check the flags, build the model and data once, time each section asked for, write the JSON, print the
    table; returns the results."""
    rcfg = check_flags(args)
    check_outputs(args)
    start = time.perf_counter()
    run = prepare(args, rcfg)
    res = results_header(run, rcfg, argv)
    for section in args.sections:
        SECTION_RUNS[section](run, res)
    res["targets"] = evaluate_targets(res)
    res["total_s"] = round(time.perf_counter() - start, 2)
    table = markdown_table(res)
    res["table"] = table
    remove_stale_temps(os.path.dirname(os.path.abspath(args.out)), log)
    write_json(args.out, res)
    print(table)
    log(f"done in {res['total_s']:.0f} s; JSON in {args.out}")
    return res


def check_flags(args):
    """The flags that contradict each other or the device, before any work; returns the runtime settings."""
    if (args.compile or args.profile) and "train" not in args.sections:
        raise CLIError(f"--{'compile' if args.compile else 'profile'} times the training step: add train to --sections")
    rcfg = runtime_from_args(args)  # checked; args.seed holds its value from here on
    if rcfg.device == "mps":
        raise CLIError("bench.py measures CPUs and CUDA GPUs (its peaks and memory readings are theirs); "
                       "pass --device cpu")
    return rcfg


@dataclasses.dataclass
class BenchRun:
    """What every section times: the preset's settings, one model and schedule, the data set on the device, the
    precision decided once, and the noise generator the training sections share."""
    args: argparse.Namespace
    device: torch.device
    precision: str
    mcfg: ModelConfig
    dcfg: DiffusionConfig
    tcfg: TrainConfig
    scfg: SampleConfig
    lcfg: LoraConfig
    data: object  # dataset.Digits, for its name
    images: torch.Tensor  # (N, C, H, W) in the model's range, on the device
    labels: torch.Tensor
    model: torch.nn.Module
    diffusion: Diffusion
    gen: torch.Generator

    def train_data(self, global_batch, label_drop, gen):
        return TrainData(images=self.images, labels=self.labels, global_batch=global_batch, seed=self.args.seed,
                         label_drop=label_drop, null_label=self.mcfg.num_classes, dist=Dist(), gen=gen)


def prepare(args, rcfg):
    """The device, the preset's settings, the data set (never downloaded), the model and the precision."""
    device = pick_device(rcfg.device)
    check_precision(rcfg.precision, device)  # an impossible choice (fp16 on a CPU) fails before any work
    args.matmul_size = args.matmul_size or default_matmul_size(device)
    mcfg, dcfg, tcfg, scfg, lcfg = (preset_config(cls, args.preset) for cls in
                                    (ModelConfig, DiffusionConfig, TrainConfig, SampleConfig, LoraConfig))
    enable_tf32(device)  # as train.py
    torch.manual_seed(args.seed)

    data = load_dataset(args.dataset or tcfg.dataset, "train", args.data_dir, download=False, log=lambda *a: None)
    batch = max(tcfg.batch_size, lcfg.lora_batch_size)
    if batch > len(data):
        raise CLIError(f"batch {batch} is larger than the {len(data)} images of {data.name}")
    run = BenchRun(args=args, device=device, precision="", mcfg=mcfg, dcfg=dcfg, tcfg=tcfg, scfg=scfg, lcfg=lcfg,
                   data=data, images=to_model_range(data.images, mcfg.img_size).to(device),
                   labels=data.labels.to(device), model=UNet(mcfg).to(device),
                   diffusion=Diffusion.from_config(dcfg).to(device), gen=None)
    # decided once, as train.py decides it: auto on CUDA times this model's training step in both precisions
    probe = precision_probe(run.model, run.diffusion, run.train_data(tcfg.batch_size, 0.0, None), dcfg.timesteps,
                            tcfg.batch_size, device)
    run.precision = resolve_precision(rcfg.precision, device, probe, log)
    run.gen = torch.Generator().manual_seed(args.seed + 1)
    return run


def results_header(run, rcfg, argv):
    """The JSON's opening part: the version, the command, the machine and the settings the figures are for."""
    args, model, precision = run.args, run.model, run.precision
    machine = machine_info(run.device)
    log(f"{machine['cpu']}, {machine['torch_threads']} thread(s), device {run.device}"
        f"{' (' + machine['gpu'] + ')' if machine['gpu'] else ''}, precision {precision}, preset {args.preset}, "
        f"{count_parameters(model) / 1e6:.2f}M parameters, {run.data.name}")
    return {"version": BENCH_VERSION, "argv": argv,
            "machine": machine,
            "config": {"preset": args.preset, "device": str(run.device), "precision": precision,
                       # what auto chose; None when not asked for
                       "precision_auto": precision if rcfg.precision == "auto" else None, "repeats": args.repeats,
                       "warmup": args.warmup, "min_time_s": args.min_time, "seed": args.seed,
                       "dataset": run.data.name, "parameters": count_parameters(model),
                       "model": dataclasses.asdict(run.mcfg), "diffusion": dataclasses.asdict(run.dcfg),
                       "lora": dataclasses.asdict(run.lcfg), "sections": args.sections},
            "memory_kind": memory_kind(run.device)}


def run_train_section(run, res):
    args, tcfg, model = run.args, run.tcfg, run.model
    log(f"matmul peak ({args.matmul_size}x{args.matmul_size}) and training step, batch {tcfg.batch_size}, "
        f"{run.precision} and fp32{' and compiled' if args.compile else ''}")
    data_fn = make_data_fn(run.train_data(tcfg.batch_size, tcfg.label_drop, run.gen), run.device,
                           run.dcfg.timesteps)
    base_state = copy.deepcopy(model.state_dict())
    res["peak"], res["train"], head_step = bench_train(model, run.diffusion, data_fn, tcfg, run.device,
                                                       run.precision, args)
    if args.profile:
        log("profiling the training step")
        res["profile"] = profile_step(head_step, run.device)
    del head_step
    model.load_state_dict(base_state)  # the later sections start from the same initial weights


def run_lora_section(run, res):
    lcfg = run.lcfg
    log(f"LoRA vs full fine-tune, batch {lcfg.lora_batch_size}")
    lora_data = make_data_fn(run.train_data(lcfg.lora_batch_size, run.tcfg.label_drop, run.gen), run.device,
                             run.dcfg.timesteps)
    res["lora"] = bench_lora(run.model, run.diffusion, lora_data(), lcfg, run.device, run.precision, run.args)


def run_inference_section(run, res):
    args, mcfg, device, model = run.args, run.mcfg, run.device, run.model
    infer_batch = args.infer_batch or 2 * args.sample_batch
    log(f"inference forward, batch {infer_batch}")
    model.eval()
    unmerged, merged = lora_models(model, run.lcfg, args.seed)
    g = torch.Generator().manual_seed(args.seed + 3)
    inputs = (torch.randn(infer_batch, mcfg.in_channels, mcfg.img_size, mcfg.img_size, generator=g).to(device),
              torch.randint(0, run.dcfg.timesteps, (infer_batch,), generator=g).to(device),
              torch.randint(0, mcfg.num_classes + 1, (infer_batch,), generator=g).to(device))
    res["inference"] = bench_inference({"base": model, "unmerged": unmerged, "merged": merged}, inputs, device,
                                       run.precision, args)


def run_sampling_section(run, res):
    log(f"sampling, batch {run.args.sample_batch}, T={run.dcfg.timesteps}")
    res["sampling"] = bench_sampling(run.model, run.diffusion, run.scfg, run.device, run.precision, run.args)


# in SECTIONS' order; the training section comes first and restores the weights it trained
SECTION_RUNS = {"train": run_train_section, "lora": run_lora_section, "inference": run_inference_section,
                "sampling": run_sampling_section}


if __name__ == "__main__":
    main()
