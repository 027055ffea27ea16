"""Adapters of every format we read (PEFT's folder, kohya's file at one rank and at mixed ranks, the old .pt),
written by an earlier version of this code and kept in tests/data/adapters, load to the same tensors, bit for
bit, and the same settings as that version loaded them (expected.json: what it read)."""
import json
import os

import pytest

from adapter import content_hash
from adapter_formats import load_adapter

DATA = os.path.join(os.path.dirname(__file__), "data", "adapters")
with open(os.path.join(DATA, "expected.json")) as f:
    EXPECTED = json.load(f)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_loads_as_it_did(name):
    want = EXPECTED[name]
    ad = load_adapter(os.path.join(DATA, name))
    assert sorted(ad.tensors) == want["keys"]
    assert content_hash(ad.tensors) == want["content_sha256"]  # names, dtypes, shapes and every bit
    got = {"r": ad.r, "alpha": ad.alpha, "targets": ad.targets, "style": ad.style,
           "base_fingerprint": ad.base_fingerprint, "base_path": ad.base_path, "base_name": ad.base_name,
           "dropout": ad.dropout, "format": ad.format, "notes": ad.notes}
    assert got == {k: want[k] for k in got}


def test_the_fixtures_cover_every_format():
    assert {EXPECTED[n]["format"] for n in EXPECTED} == {"peft", "kohya", "legacy-pt"}
