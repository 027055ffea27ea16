"""The page's fast switch: the speed adapter's slider and the lcm sampler in one click, the grid redrawn as
Studio.sample draws it at those settings, every style slider still applied; and its refusals."""
import os
import shutil

import numpy as np
import pytest
import torch

import app
import jobs
import studio as studio_mod
from config import RuntimeConfig, SampleConfig, preset_config
from studio import FAST_STEPS, Studio
from test_app import grid_picture, server  # noqa: F401 -- the page's server, on this file's out_dir
from test_page_tabs import page_at

TINY = preset_config(SampleConfig, "tiny")


def make_page(ckpt, out_dir):
    studio = Studio(ckpt, out_dir, device=torch.device("cpu"), precision="fp32", preset="tiny",
                    log=lambda *a: None)
    runner = jobs.Runner(str(ckpt), "ema", "tiny", RuntimeConfig(device="cpu", precision="fp32"),
                         os.path.join(studio.out_dir, "app", "adapters"))
    return app.Page(studio, runner)


@pytest.fixture
def out_dir(tmp_path, tiny_adapter, tiny_speed_adapter):
    """An --out-dir holding a style adapter (out/lora) and a speed adapter (out/lcm)."""
    out = tmp_path / "out"
    shutil.copytree(tiny_adapter, out / "lora")
    shutil.copytree(tiny_speed_adapter, out / "lcm")
    return out


@pytest.fixture
def page(out_dir, tiny_ckpt):
    page = make_page(tiny_ckpt, out_dir)
    yield page
    page.runner.stop()


def form(names, weights, sampler="ddim"):
    """The Sample tab's inputs: labels 0..9, one each, seed 0, ``sampler``, the tiny preset's steps, guidance 2,
    then a slider per name at ``weights``' value (0 where absent), the unused slots at 0."""
    slots = [weights.get(n, 0.0) for n in names] + [0.0] * (app.MAX_SLOTS - len(names))
    return [[str(d) for d in range(10)], 1, 0, sampler, TINY.steps, 2.0, *slots]


def test_the_switch_turns_the_speed_adapter_and_lcm_on_then_off_and_keeps_the_style_slider(page):
    studio = page.studio
    names = app.do_refresh(page)[-1]
    assert sorted(names) == ["lcm", "lora"]
    assert "speed adapter" in studio.adapters["lcm"].describe() and studio.adapters["lcm"].kind == "lcm"
    assert "style italic" in studio.adapters["lora"].describe()
    *_, last = app.do_fast(page, names, True, *form(names, {"lora": 0.5}))
    display, grid, status, sampler, steps, *slots = last
    assert (sampler, steps) == ("lcm", FAST_STEPS) and status.startswith("done")
    assert dict(zip(names, slots)) == {"lcm": 1.0, "lora": 0.5} and slots[len(names):] == [0.0] * (
        app.MAX_SLOTS - len(names))
    on = {n: {"lcm": 1.0, "lora": 0.5}[n] for n in names}  # in the sliders' order, as the title lists them
    fast = studio.sample(studio.request(sampler="lcm", steps=FAST_STEPS, guidance=2.0), on)
    assert torch.equal(grid.images, fast.images) and np.array_equal(display, fast.display)
    assert grid.settings["weights"] == on and grid.settings["sampler"] == "lcm"
    # off: the speed slider back to 0, the preset's sampler and steps; the style slider as it was
    *_, last = app.do_fast(page, names, False, *form(names, {"lora": 0.5, "lcm": 1.0}, sampler="lcm"))
    display, grid, status, sampler, steps, *slots = last
    assert (sampler, steps) == (TINY.sampler, TINY.steps)
    assert dict(zip(names, slots)) == {"lcm": 0.0, "lora": 0.5}
    plain = studio.sample(studio.request(guidance=2.0), {"lora": 0.5})
    assert np.array_equal(display, plain.display) and not np.array_equal(display, fast.display)


def test_the_switch_without_a_speed_adapter_is_refused_with_the_command_that_makes_one(tmp_path, tiny_ckpt,
                                                                                      tiny_adapter):
    out = tmp_path / "out"
    shutil.copytree(tiny_adapter, out / "lora")
    page = make_page(tiny_ckpt, out)
    try:
        names = app.do_refresh(page)[-1]
        outputs = 5 + app.MAX_SLOTS
        wrapped = app.handler(app.do_fast, page, panel=2, outputs=outputs)
        with pytest.warns(UserWarning):
            got = list(wrapped(names, True, *form(names, {"lora": 1.0})))
        assert len(got) == 1 and len(got[0]) == outputs
        line = got[0][2]
        assert line.startswith(app.ERROR_MARK) and "no speed adapter" in line and "--distill lcm" in line
        with pytest.warns(UserWarning):
            got = list(wrapped(names, "yes", *form(names, {})))
        assert "the fast switch must be on or off, got 'yes'" in got[0][2]
        # off needs no speed adapter: the preset's sampler, the style slider kept
        *_, last = app.do_fast(page, names, False, *form(names, {"lora": 1.0}, sampler="lcm"))
        assert last[3] == TINY.sampler and list(last[5:5 + len(names)]) == [1.0]
    finally:
        page.runner.stop()


def test_a_speed_adapter_whose_slider_is_not_on_this_tab_is_refused(page):
    names = app.do_refresh(page)[-1]
    others = [n for n in names if n != "lcm"]  # a tab that loaded before the speed adapter was found
    with pytest.raises(studio_mod.PageError, match="has no slider here; press Look for new adapters"):
        list(app.do_fast(page, others, True, *form(others, {})))


def test_bench_entry_times_the_fast_redraw(page):
    out = studio_mod.bench_entry(page.studio, repeats=1)
    assert out["adapters"] == 2 and out["fast_redraw_s"] > 0 and out["redraw_s"] > 0


@pytest.mark.slow
def test_the_switch_in_chromium_redraws_fast_and_a_style_slider_stays_live(server, page):  # noqa: F811
    """Tick fast: the grid is the speed adapter's at lcm-4; move the style slider: the grid again at its new weight,
    still fast; untick: the preset's sampler. Each grid as Studio.sample draws it."""
    studio = page.studio
    names = [e.name for e in studio.usable()]  # the order of the page's sliders
    style_slot = names.index("lora")

    def wait_done(tab, has, lacks="\x00"):
        tab.wait_for_function("([has, lacks]) => { const s = document.querySelector('#status').innerText; "
                              "return s.includes('done') && s.includes(has) && !s.includes(lacks) }",
                              arg=[has, lacks], timeout=120_000)
        return grid_picture(tab, server.url)

    with page_at(server.url) as tab:
        for d in range(10):
            if d != 3:
                tab.locator(f"#labels input[name='{d}']").uncheck()
        tab.locator("#fast input").check()
        fast = wait_done(tab, "lcm 1")
        sampler = tab.locator("#sampler input").input_value()
        slider = tab.locator(f"#weight_{style_slot} input[type=number]")
        slider.fill("1.5")
        slider.blur()
        styled = wait_done(tab, "lora 1.5")
        tab.locator("#fast input").uncheck()
        plain = wait_done(tab, "lora 1.5", lacks="lcm 1")
    req = studio.request([3], sampler="lcm", steps=FAST_STEPS, guidance=TINY.guidance)
    order = {n: i for i, n in enumerate(names)}
    assert sampler == "lcm"
    assert np.array_equal(fast, studio.sample(req, {"lcm": 1.0}).display)
    both = dict(sorted({"lcm": 1.0, "lora": 1.5}.items(), key=lambda kv: order[kv[0]]))
    assert np.array_equal(styled, studio.sample(req, both).display)
    assert np.array_equal(plain, studio.sample(studio.request([3]), {"lora": 1.5}).display)
