"""bench.py's results read against its targets, and the Markdown table it prints and stores in its JSON.

    res["targets"] = evaluate_targets(res)     # every target whose section ran: value, pass or fail
    print(markdown_table(res))

The targets are reported as measured, never enforced.
"""
from __future__ import annotations

from timing import MB

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
    """The run as Markdown: a header naming the machine, a row per figure with its target, then the profile."""
    m, c = res["machine"], res["config"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    table = _Rows(res["targets"])
    table.lines += [
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
    for section, rows in (("train", _train_rows), ("lora", _lora_rows), ("inference", _inference_rows),
                          ("sampling", _sampling_rows)):
        if section in res:
            rows(table, res)
    passed = sum(t["pass"] for t in res["targets"])
    lines = table.lines + ["", f"{passed} of {len(res['targets'])} targets met; total {res['total_s']:.0f} s."]
    if res.get("profile"):
        lines += _profile_lines(res)
    return "\n".join(lines)


class _Rows:
    """The table's lines, and a row maker that adds a row's target and whether it was met."""

    def __init__(self, targets):
        self.lines = []
        self.targets = {t["name"]: t for t in targets}

    def row(self, what, median, derived="", mem="", target=None):
        t = self.targets.get(target)
        goal = f"{t['op']} {t['threshold']:g}" if t else ""
        met = ("PASS" if t["pass"] else "FAIL") if t else ""
        self.lines.append(f"| {what} | {median} | {derived} | {mem} | {goal} | {met} |")


def _mem(d, prefix=""):
    return f"{d[prefix + 'mem_peak_mb']:,.0f} MB (+{d[prefix + 'mem_delta_mb']:,.0f})"


def _train_rows(table, res):
    row = table.row
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
            _mem(r), "train_fp32_peak_fraction" if head else None)
        row(f"  data wait ({name})", _fmt_ms(r["data_ms"]), f"{100 * r['data_wait_share']:.2f}% of the step", "",
            "data_wait_share" if head else None)
    if tr["compile"]:
        cp = tr["compile"]
        row("  torch.compile", "", f"{cp['speedup']:.2f}x eager ({'kept' if cp['kept'] else 'not kept'}; "
            f"first call {cp['first_call_s']:.0f} s)")


def _lora_rows(table, res):
    lo = res["lora"]
    table.row(f"full fine-tune step ({lo['precision']})", _fmt_ms(lo["full_step_ms"]), "", _mem(lo, "full_"))
    table.row(f"LoRA fine-tune step (r={lo['r']}, {','.join(lo['targets'])})", _fmt_ms(lo["step_ms"]),
              f"{lo['step_ratio']:.2f}x full", _mem(lo), "lora_step_ratio")
    table.row("LoRA AdamW state", _fmt_bytes(lo["opt_state_bytes"]),
              f"{100 * lo['opt_state_ratio']:.2f}% of full ({_fmt_bytes(lo['full_opt_state_bytes'])}); "
              f"{lo['trainable_params']:,} of {lo['total_params']:,} parameters trained", "", "lora_opt_state_ratio")


def _inference_rows(table, res):
    inf = res["inference"]
    table.row(f"forward base (batch {inf['batch_size']}, {inf['precision']})", _fmt_ms(inf["base_ms"]), "",
              _mem(inf, "base_"))
    table.row("forward LoRA unmerged", _fmt_ms(inf["unmerged_ms"]), f"{inf['unmerged_over_base']:.3f}x base",
              _mem(inf, "unmerged_"), "unmerged_over_base")
    table.row("forward LoRA merged", _fmt_ms(inf["merged_ms"]),
              f"{inf['merged_over_base']:.3f}x base (max |merged - unmerged| {inf['merged_max_abs_diff']:.1e})",
              _mem(inf, "merged_"), "merged_over_base")


def _sampling_rows(table, res):
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
            table.row(label, _fmt_ms(r[f"{g}_ms_per_sample"]), derived, _mem(r, f"{g}_"), target)


def _profile_lines(res):
    pr = res["profile"]
    gpu = pr["sorted_by"] == "self_device_time"
    total = pr["total_self_device_ms_per_step"] if gpu else pr["total_self_cpu_ms_per_step"]
    lines = ["", f"Top ops of the training step ({res['train']['headline']}, torch.profiler) by self "
             f"{'GPU' if gpu else 'CPU'} time, {total:,.1f} ms per step in all:", "",
             "| op | calls/step | self CPU ms/step | CPU share |" + (" self GPU ms/step | GPU share |" if gpu else ""),
             "|---|---:|---:|---:|" + ("---:|---:|" if gpu else "")]
    for r in pr["top"]:
        line = (f"| {r['op'][:80]} | {r['calls_per_step']:g} | {r['self_cpu_ms_per_step']:.2f} | "
                f"{100 * r['self_cpu_share']:.1f}% |")
        if gpu:
            line += f" {r['self_device_ms_per_step']:.2f} | {100 * r['self_device_share']:.1f}% |"
        lines.append(line)
    return lines
