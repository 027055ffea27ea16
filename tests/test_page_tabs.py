"""The page's tabs in headless Chromium (slow): drawing digit after digit and fine-tuning on them alone, an error
that stays in its panel, the weight sweep column by column, a saved PNG giving its settings back, img2img."""
import contextlib
import os
import time

import pytest

import pictures
import style_training
from conftest import ROOT
from test_app import BROWSER_ARGS, find_browser, out_dir, server  # noqa: F401 -- fixtures, shared

VIEW = {"width": 1366, "height": 768}  # every tab fits this


@contextlib.contextmanager
def page_at(url, tab=None):
    """The page at ``url`` in headless Chromium, loaded (its first slider there) and on ``tab``; closed after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser()[1], args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport=VIEW)
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.locator("#weight_0 input[type=number]").wait_for(timeout=120_000)
            if tab:
                page.get_by_role("tab", name=tab).click()
            yield page
        finally:
            browser.close()


def wait_text(page, elem_id, text, timeout=120_000):
    page.wait_for_function(f"(t) => (document.querySelector('#{elem_id}')?.innerText || '').includes(t)", arg=text,
                           timeout=timeout)
    return page.locator(f"#{elem_id}").inner_text()


def draw(page, elem_id, label, n):
    """Strokes of a digit on the sketchpad ``elem_id`` (a bar, shifted by ``n`` so no two are alike)."""
    pad = page.locator(f"#{elem_id}")
    pad.locator("canvas").first.wait_for()
    if pad.get_by_label("Brush").count():  # the brush is picked once; after that its button is its colour
        pad.get_by_label("Brush").click()
        page.wait_for_timeout(500)  # the canvas takes the brush on its next frame
    box = pad.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2 + (n % 5) - 2, box["y"] + box["height"] / 2 - 40
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(12):
        page.mouse.move(x + (k % 3) + label % 3, y + 7 * k)
    page.mouse.up()


@pytest.mark.slow
def test_drawings_one_after_another_then_a_fine_tune_on_them_alone(server):  # noqa: F811
    """Draw, add, clear, draw again: every drawing is added with its label; style_training.MIN_STYLE_IMAGES of them alone
    train an adapter (tiny preset), which ends on the base against it and gets a slider."""
    with page_at(server.url, "Your style") as page:
        for n in range(3):
            draw(page, "sketch", 0, n)
            page.locator("#add_drawing").click()
            wait_text(page, "style_msg", f"{n + 1} drawing(s) added")
        page.locator("#clear_drawings").click()
        wait_text(page, "style_msg", "drawings cleared")
        for n in range(style_training.MIN_STYLE_IMAGES):
            label = n % 2 * 7  # 0 and 7 by turns
            page.locator("#sketch_label input").fill(str(label))
            page.locator("#sketch_label input").press("Enter")
            draw(page, "sketch", label, n)
            page.locator("#add_drawing").click()
            msg = wait_text(page, "style_msg", f"{n + 1} drawing(s) added")
        assert f"0: {style_training.MIN_STYLE_IMAGES // 2}" in msg and f"7: {style_training.MIN_STYLE_IMAGES // 2}" in msg, msg
        page.locator("#style_name input, #style_name textarea").first.fill("drawn")
        page.locator("#ft_steps input").fill("2")
        page.locator("#train").click()
        wait_text(page, "style_msg", "has a slider now", timeout=300_000)
        assert "step 2 of 2" in page.locator("#ft_progress").inner_text()
        assert page.locator("#ft_result img").count() == 1  # the base against the new adapter
        assert "app/adapters/drawn" in page.locator("#weight_1").inner_text()


@pytest.mark.slow
def test_an_error_stays_in_its_panel(server):  # noqa: F811
    """A refusal is a line in its panel, still there 15 s later (the pop-up fades), until that panel's next action."""
    with page_at(server.url, "Your style") as page:
        page.locator("#check").click()
        first = wait_text(page, "style_msg", "Refused")
        assert f"at least {style_training.MIN_STYLE_IMAGES}" in first and "\n" not in first.strip()
        time.sleep(15)
        assert page.locator("#style_msg").inner_text() == first
        page.locator("#clear_drawings").click()  # the panel's next action replaces it
        wait_text(page, "style_msg", "drawings cleared")
        if os.environ.get("SAVE_SCREENSHOT"):  # the README's picture of the page
            page.get_by_role("tab", name="Sample").click()
            page.locator("#sample").click()
            wait_text(page, "status", "done")
            page.screenshot(path=os.path.join(ROOT, "docs", "app.png"))


@pytest.mark.slow
def test_the_sweep_shows_its_columns_as_they_finish(server):  # noqa: F811
    """The sweep's line counts its columns up to the last; how long it takes is measured, not tested here."""
    import studio

    with page_at(server.url, "Adapters") as page:
        page.locator("#sweep").click()
        wait_text(page, "adapter_msg", f"column {len(studio.SWEEP_WEIGHTS)} done")
        assert page.locator("#extra img").count() == 1


@pytest.mark.slow
def test_a_saved_png_gives_its_settings_back(server, out_dir):  # noqa: F811
    if not hasattr(pictures, "read_png_settings"):
        pytest.skip("pictures.read_png_settings is not in this version yet")
    with page_at(server.url) as page:
        page.locator("#seed input").fill("7")
        page.locator("#sample").click()
        wait_text(page, "status", "done")
        page.locator("#save").click()
        wait_text(page, "status", "saved")
        page.locator("#seed input").fill("1")
        page.locator("#png_in input[type=file]").set_input_files(str(out_dir / "app" / "app_samples.png"))
        wait_text(page, "status", "settings of")
        assert page.locator("#seed input").input_value() == "7"


@pytest.mark.slow
def test_img2img_from_a_drawn_digit_with_a_live_slider(server):  # noqa: F811
    """Draw a digit, restyle it: the input beside the result; a weight slider's release redraws it there."""
    with page_at(server.url, "From a digit") as page:
        draw(page, "i2i_sketch", 1, 0)
        page.locator("#i2i").click()
        first = wait_text(page, "i2i_msg", "done")
        assert "no adapter" in first and page.locator("#i2i_out img").count() == 1
        slider = page.locator("#weight_0 input[type=number]")
        slider.fill("1.5")
        slider.blur()
        assert "lora 1.5" in wait_text(page, "i2i_msg", "lora 1.5")
        assert "denoising" not in page.locator("#status").inner_text()  # the Sample tab's grid was not redrawn
