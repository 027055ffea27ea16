"""bench.py: one tiny run end to end, its JSON checked field by field; bad flags; the helpers (timing.py,
bench_report.py).

No assertion depends on how fast anything ran: only that times are positive and that every
ratio and rate agrees with the times it was computed from.
"""
import json
import math

import pytest
import torch

import bench
import bench_report
import timing
from config import ModelConfig, preset_config
from diffusion import Diffusion
from unet import UNet

SAMPLERS = ("ddpm", "ddim50", "ddim20", "dpmpp-2m10")
TARGET_NAMES = [t[0] for t in bench_report.TARGETS]


def close(a, b, rel=2e-3, abs_=1e-6):
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    # --ddpm-steps 10 of T=50 exercises the extrapolation; a smaller matmul keeps the run short
    res = bench.main(["--preset", "tiny", "--repeats", "1", "--device", "cpu", "--out", str(out),
                      "--ddpm-steps", "10", "--matmul-size", "512", "--min-time", "0.05"])
    return res, json.loads(out.read_text()), out


def test_json_written_atomically_and_equal_to_result(tiny_run):
    res, js, out = tiny_run
    assert js == json.loads(json.dumps(res))
    assert [p.name for p in out.parent.iterdir()] == ["b.json"]  # no temporary file left behind
    assert set(js) >= {"version", "argv", "machine", "config", "memory_kind", "peak", "train", "lora", "inference",
                       "sampling", "targets", "total_s", "table"}
    assert js["total_s"] > 0


def test_machine_description(tiny_run):
    m = tiny_run[1]["machine"]
    assert isinstance(m["cpu"], str) and m["cpu"]
    assert m["torch"] == torch.__version__
    assert m["torch_threads"] >= 1 and m["cpu_count"] >= 1 and m["cpus_available"] >= 1
    assert m["device"] == "cpu" and m["gpu"] is None
    assert isinstance(m["cpu_bf16_hardware"], bool)
    assert tiny_run[1]["memory_kind"] == "process_peak_rss"


def test_peak(tiny_run):
    js = tiny_run[1]
    pk = js["peak"]
    assert pk["matmul_size"] == 512
    assert pk["fp32_gflops"] > 0
    assert pk["tf32_gflops"] is None  # CUDA only
    wanted = js["machine"]["cpu_bf16_hardware"] or js["config"]["precision"] == "bf16"
    assert (pk["bf16_gflops"] is not None) == wanted


def test_training(tiny_run):
    js = tiny_run[1]
    tr, pk = js["train"], js["peak"]
    used = js["config"]["precision"]
    assert used == js["config"]["precision_auto"] == tr["precision_used"] == tr["headline"]
    assert set(tr["runs"]) == {used, "fp32"}
    assert tr["flops_per_step"] > 0 and tr["batch_size"] == 16
    assert tr["compile"] is None
    for name, r in tr["runs"].items():
        assert r["precision"] == name and r["compiled"] is False
        assert r["step_ms"] > 0 and r["first_call_s"] > 0
        assert close(r["images_per_s"], tr["batch_size"] / (r["step_ms"] / 1e3))
        assert close(r["achieved_gflops"], tr["flops_per_step"] / (r["step_ms"] / 1e3) / 1e9)
        assert r["peak_key"] == name  # on a CPU every precision is held against its own matmul peak
        assert close(r["peak_fraction"], r["achieved_gflops"] / pk[f"{name}_gflops"], abs_=1e-4)
        assert close(r["fp32_peak_fraction"], r["achieved_gflops"] / pk["fp32_gflops"], abs_=1e-4)
        assert 0 < r["data_ms"] < r["step_ms"]
        assert close(r["data_wait_share"], r["data_ms"] / r["step_ms"], abs_=1e-4)
        assert r["mem_peak_mb"] > 0 and r["mem_delta_mb"] >= 0


def test_lora(tiny_run):
    js = tiny_run[1]
    lo = js["lora"]
    assert lo["step_ms"] > 0 and lo["full_step_ms"] > 0
    assert close(lo["step_ratio"], lo["step_ms"] / lo["full_step_ms"])
    # AdamW keeps two fp32 moments per trained parameter
    assert lo["opt_state_bytes"] == 2 * 4 * lo["trainable_params"]
    assert lo["full_opt_state_bytes"] == 2 * 4 * js["config"]["parameters"]
    assert lo["total_params"] == js["config"]["parameters"] + lo["trainable_params"]
    assert close(lo["opt_state_ratio"], lo["opt_state_bytes"] / lo["full_opt_state_bytes"])
    assert lo["r"] == 2 and lo["targets"] == ["Wq", "Wk", "Wv"]
    assert lo["mem_peak_mb"] > 0 and lo["full_mem_peak_mb"] > 0


def test_inference(tiny_run):
    inf = tiny_run[1]["inference"]
    assert inf["batch_size"] == 20  # 2 x --sample-batch: one guided sampling step
    for k in ("base_ms", "unmerged_ms", "merged_ms"):
        assert inf[k] > 0
    # the ratios are rounded to 4 places: a small one (a base forward slowed by a busy machine) is off by up to 5e-5
    assert close(inf["merged_over_base"], inf["merged_ms"] / inf["base_ms"], abs_=5e-5)
    assert close(inf["unmerged_over_base"], inf["unmerged_ms"] / inf["base_ms"], abs_=5e-5)
    assert inf["merged_max_abs_diff"] < 1e-4  # merging changes the cost, not the output
    for k in ("base", "unmerged", "merged"):
        assert inf[f"{k}_mem_peak_mb"] > 0


def test_sampling(tiny_run):
    sa = tiny_run[1]["sampling"]
    assert sa["T"] == 50 and sa["batch_size"] == 10 and sa["guidance"] > 0
    assert set(sa["runs"]) == set(SAMPLERS)
    ddpm = sa["runs"]["ddpm"]
    assert ddpm["sampler"] == "ddpm" and ddpm["steps"] == 50
    assert ddpm["steps_timed"] == 10 and ddpm["extrapolated"] is True
    assert sa["runs"]["ddim50"]["steps"] == 50 and sa["runs"]["ddim20"]["steps"] == 20
    assert not sa["runs"]["ddim50"]["extrapolated"]
    for r in sa["runs"].values():
        assert r["guided_ms_per_sample"] > 0 and r["unguided_ms_per_sample"] > 0
    for g in ("guided", "unguided"):
        assert close(sa[f"ddpm_over_ddim50_{g}"],
                     ddpm[f"{g}_ms_per_sample"] / sa["runs"]["ddim50"][f"{g}_ms_per_sample"], rel=5e-3)


def _result_with(values):
    """The smallest bench result evaluate_targets reads, holding ``values`` ({target name: value})."""
    head = {"fp32_peak_fraction": values["train_fp32_peak_fraction"], "data_wait_share": values["data_wait_share"]}
    return {"train": {"headline": "fp32", "runs": {"fp32": head}},
            "lora": {"step_ratio": values["lora_step_ratio"], "opt_state_ratio": values["lora_opt_state_ratio"]},
            "inference": {"merged_over_base": values["merged_over_base"],
                          "unmerged_over_base": values["unmerged_over_base"]},
            "sampling": {"ddpm_over_ddim50_guided": values["ddpm_over_ddim50"]}}


def test_targets_pass_at_the_threshold_and_fail_beyond_it():
    at = {name: thr for name, _, _, thr in bench_report.TARGETS}
    at["data_wait_share"] = 0.049  # a strict '<': the threshold itself fails
    targets = bench_report.evaluate_targets(_result_with(at))
    assert [t["name"] for t in targets] == TARGET_NAMES
    assert all(t["pass"] for t in targets), targets
    worse = {name: thr * (0.5 if op == ">=" else 2.0) for name, _, op, thr in bench_report.TARGETS}
    targets = bench_report.evaluate_targets(_result_with(worse))
    assert not any(t["pass"] for t in targets), targets
    assert {t["name"]: t["value"] for t in targets} == worse


def test_table_lists_every_section(tiny_run):
    table = tiny_run[1]["table"]
    assert table.count("\n| ") >= 15
    for text in ("matmul fp32", "train step fp32", "LoRA fine-tune step", "forward LoRA merged", "DDIM-50",
                 "DDPM-50", "10 of 50 steps timed, extrapolated", "Intel" if "Intel" in tiny_run[1]["machine"]["cpu"]
                 else tiny_run[1]["machine"]["cpu"]):
        assert text in table


def test_sections_measure_only_what_is_asked(tmp_path):
    out = tmp_path / "train.json"
    res = bench.main(["--preset", "tiny", "--repeats", "1", "--device", "cpu", "--out", str(out), "--sections",
                      "train", "--matmul-size", "256", "--min-time", "0"])
    js = json.loads(out.read_text())
    assert js == json.loads(json.dumps(res))
    assert js["config"]["sections"] == ["train"]
    assert {"peak", "train"} <= set(js) and not {"lora", "inference", "sampling"} & set(js)
    assert [t["name"] for t in js["targets"]] == ["train_fp32_peak_fraction", "data_wait_share"]
    assert "train step" in js["table"] and "LoRA" not in js["table"] and "DDIM" not in js["table"]
    assert "2 targets met" in js["table"] or "of 2 targets met" in js["table"]


# ----------------------------------------------------------------- bad flags

@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--repeats", "x"], ["--device", "tpu"], ["--preset", "huge"],
                                  ["--warmup", "0"], ["--min-time", "-1"], ["--no-such-flag"],
                                  ["--precision", "fp16", "--device", "cpu"], ["--sections", "train,gpu"],
                                  ["--sections", ""], ["--sections", "lora", "--profile"]])
def test_bad_flags_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--out", str(tmp_path / "b.json")])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_absent_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--out", str(tmp_path / "b.json")])
    assert e.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


# -------------------------------------------------------------------- helpers

def test_measure_interleaves_and_counts():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    tm = timing.measure(fns, torch.device("cpu"), repeats=3, warmup=2, min_time=0.0)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups, then rounds taking turns
    for t in tm.values():
        assert t.number == 1 and len(t.runs_s) == 3 and len(t.warmup_s) == 2
        assert t.median_s == sorted(t.runs_s)[1]
        assert t.mem_peak > 0


def test_optimizer_state_bytes():
    lin = torch.nn.Linear(3, 5)
    opt = torch.optim.AdamW(lin.parameters())
    assert bench.optimizer_state_bytes(opt) == 0  # no step yet, no state
    lin(torch.ones(2, 3)).sum().backward()
    opt.step()
    assert bench.optimizer_state_bytes(opt) == 2 * 4 * (3 * 5 + 5)


def test_train_flops_are_forward_plus_backward_and_include_attention():
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(preset_config(ModelConfig, "tiny"))
    diffusion = Diffusion(timesteps=50)
    batch = (torch.randn(4, 1, 28, 28), torch.arange(4), torch.randint(0, 50, (4,)), torch.randn(4, 1, 28, 28))
    fwd = FlopCounterMode(display=False)
    with fwd, torch.no_grad():
        diffusion.loss(model, *batch)
    total = timing.count_train_flops(model, diffusion, batch)
    # backward costs about twice the forward (gradients for inputs and for weights)
    assert 2.5 * fwd.get_total_flops() <= total <= 3.5 * fwd.get_total_flops()
    # the attention's q k^T and attn @ v batched matmuls are counted
    assert fwd.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) > 0
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


# ------------------------------------------------------------ the peak, per device

def test_matmul_size_is_large_on_cuda():
    assert bench.parse_args([]).matmul_size is None  # resolved per device at the start of the run
    assert timing.default_matmul_size(torch.device("cuda")) == 8192  # milliseconds per product on an H100
    assert timing.default_matmul_size(torch.device("cpu")) == 2048


@pytest.mark.parametrize("device,precision,key", [
    ("cpu", "fp32", "fp32"), ("cpu", "bf16", "bf16"),
    ("cuda", "fp32", "tf32"),  # train.py runs fp32 with TF32 on (runtime.enable_tf32)
    ("cuda", "bf16", "bf16"), ("cuda", "fp16", "fp16"),
])
def test_each_precision_is_held_against_its_own_peak(device, precision, key):
    assert timing.peak_key(precision, torch.device(device)) == key


def test_cuda_measures_every_peak_the_training_precisions_need(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert timing.matmul_kinds(cuda, "bf16") == ["fp32", "tf32", "bf16"]
    assert timing.matmul_kinds(cuda, "fp16") == ["fp32", "tf32", "bf16", "fp16"]
    for precision in ("fp32", "bf16", "fp16"):
        assert timing.peak_key(precision, cuda) in timing.matmul_kinds(cuda, precision)


def test_cuda_timing_uses_events_around_the_calls(monkeypatch):
    """On CUDA a round is timed by two events recorded around the calls, read after the end event syncs."""
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = "start" if not any(e.startswith("new") for e in log) else "end"
            log.append(f"new {self.name}")

        def record(self):
            log.append(f"record {self.name}")

        def synchronize(self):
            log.append(f"synchronize {self.name}")

        def elapsed_time(self, other):
            log.append(f"elapsed {self.name}->{other.name}")
            return 12.5  # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(timing, "sync", lambda device: log.append("sync"))
    seconds = timing._time_calls(lambda: log.append("call"), 3, torch.device("cuda"))
    assert seconds == 0.0125
    assert log == ["sync", "new start", "new end", "record start", "call", "call", "call", "record end",
                   "synchronize end", "elapsed start->end"]


# ------------------------------------------------- the trainer's step, the one sampler

def test_bench_step_is_the_step_fit_runs():
    """bench times trainer.make_train_step, the function trainer.fit calls: three bench steps leave the weights,
    the optimizer state and the after_step (EMA) calls exactly where three steps of fit leave them."""
    import trainer
    from runtime import Dist

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1, torch.arange(32) % 10
    diffusion = Diffusion(timesteps=50)

    def data():
        return trainer.TrainData(images=images, labels=labels, global_batch=8, seed=0, label_drop=0.2, null_label=10,
                                 dist=Dist(), gen=torch.Generator().manual_seed(1))

    runs = {}
    for how in ("fit", "bench"):
        torch.manual_seed(0)
        model = UNet(preset_config(ModelConfig, "tiny"))
        opt = trainer.make_optimizer(model.parameters(), 1e-3, 0.0, cpu)
        calls = []
        if how == "fit":
            settings = trainer.FitSettings(max_steps=3, lr_fn=lambda s: 1e-3, grad_clip=1.0, device=cpu,
                                           precision="fp32", desc="fit")
            hooks = trainer.Hooks(on_epoch_end=lambda *a: None, on_interrupt=lambda *a: None, after_step=calls.append)
            assert trainer.fit(model, opt, diffusion, data(), settings, 0, hooks)[0] == 3
        else:
            model.train()
            step, data_s = bench.make_step(model, opt, diffusion, bench.make_data_fn(data(), cpu, 50), lr=1e-3,
                                           grad_clip=1.0, device=cpu, precision="fp32", after_step=calls.append)
            for _ in range(3):
                step()
            assert len(data_s) == 3 and all(s > 0 for s in data_s)
        runs[how] = model.state_dict(), opt.state_dict()["state"], calls
    (w_fit, opt_fit, calls_fit), (w_bench, opt_bench, calls_bench) = runs["fit"], runs["bench"]
    assert calls_fit == calls_bench == [0, 1, 2]
    assert all(torch.equal(w_fit[k], w_bench[k]) for k in w_fit)
    assert all(torch.equal(opt_fit[i][k], opt_bench[i][k]) for i in opt_fit for k in opt_fit[i])
    assert not all(torch.equal(w_fit[k], v) for k, v in UNet(preset_config(ModelConfig, "tiny")).state_dict().items())


@pytest.mark.parametrize("sampler,num_steps,expected", [
    ("ddpm", 4, [49, 48, 47, 46]),  # the first steps of DDPM, from t = T-1 down, stopped by the callback
    ("ddpm", None, list(range(49, -1, -1))),
    ("ddim", None, [49, 37, 24, 12, 0]),  # Diffusion.ddim_timesteps(5) of T = 50
])
def test_sample_steps_runs_the_sampler_for_the_steps_timed(sampler, num_steps, expected):
    from config import SampleConfig

    torch.manual_seed(0)
    model = UNet(preset_config(ModelConfig, "tiny")).eval()
    diffusion = Diffusion(timesteps=50)
    assert diffusion.ddim_timesteps(5) == [49, 37, 24, 12, 0]
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((len(args[0]), args[1][0].item())))
    bench.sample_steps(model, diffusion, torch.arange(3), torch.device("cpu"), "fp32",
                       SampleConfig(sampler=sampler, steps=5, guidance=2.0), seed=0, num_steps=num_steps)
    assert seen == [(6, t) for t in expected]  # one guided forward (2 x 3 images) per step
