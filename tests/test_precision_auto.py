"""--precision auto: the rule on CPUs, and on CUDA the faster of bf16 and fp32, decided by timing a probe.

The timer is replaced by a fake one, so these tests say which precision the decision picks for
given timings, never how fast anything ran."""
import pytest
import torch

import runtime
from config import ModelConfig, preset_config
from diffusion import Diffusion
from runtime import fastest_precision, resolve_precision
from trainer import TrainData, precision_probe
from unet import UNet

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only a name here: nothing runs on it


def fake_timer(seconds):
    """timer(fn, device) that runs fn and reports ``seconds[precision]`` for the probe call it made."""
    def timer(fn, device):
        fn()
        return seconds[calls[-1]]
    calls = []
    return timer, calls


@pytest.mark.parametrize("seconds,expected", [
    ({"bf16": 0.0454, "fp32": 0.0372}, "fp32"),  # a launch-bound small model: autocast's casts cost more
    ({"bf16": 0.134, "fp32": 0.310}, "bf16"),  # a large model: tensor cores in bf16 win
    ({"bf16": 0.05, "fp32": 0.05}, "bf16"),  # a tie goes to the first candidate
])
def test_fastest_precision_picks_the_lowest_median(seconds, expected):
    timer, calls = fake_timer(seconds)
    logged = []
    best = fastest_precision(calls.append, ("bf16", "fp32"), CPU, warmup=2, repeats=3, timer=timer,
                             log=logged.append)
    assert best == expected
    assert calls == ["bf16", "bf16", "fp32", "fp32"] + ["bf16", "fp32"] * 3  # warm-ups, then rounds taking turns
    assert logged and logged[0].endswith(f"-> {expected}") and "bf16 " in logged[0] and "fp32 " in logged[0]


def test_fastest_precision_uses_medians_not_one_slow_round():
    times = iter([0.040, 0.030, 0.500, 0.030, 0.040, 0.030])  # bf16, fp32 taking turns; one bf16 round hiccups
    best = fastest_precision(lambda p: None, ("bf16", "fp32"), CPU, warmup=1, repeats=3,
                             timer=lambda fn, device: next(times))
    assert best == "fp32"
    times = iter([0.030, 0.040, 0.030, 0.500, 0.030, 0.040])  # now fp32 hiccups once, bf16 is faster
    best = fastest_precision(lambda p: None, ("bf16", "fp32"), CPU, warmup=1, repeats=3,
                             timer=lambda fn, device: next(times))
    assert best == "bf16"


def test_fastest_precision_leaves_the_global_rng_where_it_was():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    def timer(fn, device):
        fn()
        return 1.0
    fastest_precision(lambda p: torch.rand(100), ("bf16", "fp32"), CPU, timer=timer)
    assert torch.equal(torch.rand(3), expected)


def test_cuda_auto_asks_the_probe_and_takes_its_answer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    asked = []

    def decide(probe, candidates, device, log=None):
        asked.append(candidates)
        return "fp32"
    monkeypatch.setattr(runtime, "fastest_precision", decide)
    assert resolve_precision("auto", CUDA) == "bf16"  # no probe: the rule
    assert resolve_precision("auto", CUDA, probe=lambda p: None) == "fp32"
    assert asked == [("bf16", "fp32")]
    assert resolve_precision("bf16", CUDA, probe=lambda p: None) == "bf16"  # an explicit choice is never probed
    assert len(asked) == 1
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", CUDA) == "fp16"
    resolve_precision("auto", CUDA, probe=lambda p: None)
    assert asked[-1] == ("fp16", "fp32")


@pytest.mark.parametrize("bf16_hardware", [True, False])
def test_cpu_auto_is_the_hardware_rule_and_never_probes(monkeypatch, bf16_hardware):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: bf16_hardware)

    def probe(precision):
        raise AssertionError("the CPU must not be probed")
    assert resolve_precision("auto", CPU, probe=probe) == ("bf16" if bf16_hardware else "fp32")


def test_precision_probe_changes_no_weight_and_leaves_no_gradient():
    cfg = preset_config(ModelConfig, "tiny")
    model = UNet(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TrainData(images=torch.randn(8, 1, 28, 28), labels=torch.arange(8) % 10, global_batch=4, seed=0,
                     label_drop=0.1, null_label=10, dist=runtime.Dist(), gen=torch.Generator().manual_seed(1))
    gen_state = data.gen.get_state()
    probe = precision_probe(model, Diffusion(timesteps=50), data, 50, 4, CPU)
    probe("fp32")
    probe("bf16")
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(data.gen.get_state(), gen_state)  # the run's noise generator is not drawn from


def test_an_impossible_precision_fails_at_start_up():
    from errors import CLIError
    with pytest.raises(CLIError, match="fp16 is for GPUs"):
        runtime.check_precision("fp16", CPU)
    with pytest.raises(CLIError, match="unknown precision 'fp64'"):
        resolve_precision("fp64", CPU)
    runtime.check_precision("fp16", CUDA)  # a GPU may


def test_under_torchrun_rank_0_decides_for_every_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(runtime, "fastest_precision", lambda probe, candidates, device, log=None: "fp32")
    sent = []

    def broadcast(obj, dist_info):
        sent.append(obj)
        return "bf16"  # what rank 0 found, whatever this rank timed
    monkeypatch.setattr(runtime, "broadcast_object", broadcast)
    dist_info = runtime.Dist(rank=1, world=2)
    assert resolve_precision("auto", CUDA, probe=lambda p: None, dist_info=dist_info) == "bf16"
    assert sent == ["fp32"]
    assert resolve_precision("fp32", CUDA, probe=lambda p: None, dist_info=dist_info) == "fp32"  # nothing to agree on
    assert len(sent) == 1
