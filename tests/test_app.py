"""The page (app.py): its functions against denoise.py, its path and upload checks, its fine-tune process, and
the real page driven in headless Chromium (slow; a missing browser is a skip, or a failure when CI is set)."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import app
import denoise
from adapter import load_adapter
from config import SampleConfig, preset_config
from conftest import ROOT

CPU = torch.device("cpu")
TINY_STEPS = preset_config(SampleConfig, "tiny").steps


def tiny_settings(**kw):
    return app.SampleSettings(**{"steps": TINY_STEPS, **kw})


@pytest.fixture
def out_dir(tmp_path, tiny_adapter):
    """An --out-dir holding one adapter, out/lora, copied from the shared tiny fine-tune."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(tiny_adapter, out / "lora")
    return out


@pytest.fixture
def studio(tiny_ckpt, out_dir):
    s = app.Studio(tiny_ckpt, out_dir, device=CPU, precision="fp32", preset="tiny", log=lambda *a: None)
    yield s
    s.close()


def denoise_npz(ckpt, out, *extra):
    denoise.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--device", "cpu", "--precision", "fp32",
                  "--steps", str(TINY_STEPS), "--frames", "0", *extra])
    name = "lora_samples" if "--lora" in extra else "samples"
    with np.load(out / f"{name}.npz") as f:
        return f["images"], f["labels"], np.asarray(Image.open(out / f"{name}.png"))


# ------------------------------------------------------------------ sampling as denoise.py does

def test_sample_grid_is_denoise_grid(studio, tiny_ckpt, tmp_path):
    images, labels, png = denoise_npz(tiny_ckpt, tmp_path / "d", "--labels", "3,7", "--n-per-label", "2",
                                      "--seed", "5")
    grid = app.sample_grid(studio, tiny_settings(labels=(3, 7), n_per_label=2, seed=5))
    assert np.array_equal(grid.images.numpy(), images) and np.array_equal(grid.labels.numpy(), labels)
    assert np.array_equal(grid.picture, png)  # same layout: a column per label
    again = app.sample_grid(studio, tiny_settings(labels=(3, 7), n_per_label=2, seed=5))
    other = app.sample_grid(studio, tiny_settings(labels=(3, 7), n_per_label=2, seed=6))
    assert np.array_equal(again.display, grid.display) and not np.array_equal(other.images, grid.images)
    # the picture shown is the grid, 4x, under a strip of labels
    h, w = (n * app.UPSCALE for n in grid.picture.shape)
    assert np.array_equal(grid.display[-h:, :w][::app.UPSCALE, ::app.UPSCALE], grid.picture)
    one = app.sample_grid(studio, tiny_settings(labels=(3,)))  # narrower than its title, which is kept whole
    assert one.display.shape[1] > one.picture.shape[1] * app.UPSCALE
    assert np.array_equal(one.display[-one.picture.shape[0] * app.UPSCALE:, :one.picture.shape[1] * app.UPSCALE]
                          [::app.UPSCALE, ::app.UPSCALE], one.picture)


def test_adapter_weight_is_applied_as_denoise_applies_it(studio, tiny_ckpt, out_dir, tmp_path):
    assert [e.name for e in studio.usable()] == ["lora"]
    base = app.sample_grid(studio, tiny_settings())
    images, _, _ = denoise_npz(tiny_ckpt, tmp_path / "d", "--lora", f"{out_dir / 'lora'}:0.5")
    half = app.sample_grid(studio, tiny_settings(), {"lora": 0.5})
    assert np.array_equal(half.images.numpy(), images)
    assert not np.array_equal(half.images, base.images)
    assert half.settings["weights"] == {"lora": 0.5}
    # back to 0 is the base exactly: a weight is a knob, not a reload
    assert np.array_equal(app.sample_grid(studio, tiny_settings(), {"lora": 0.0}).images, base.images)


def test_model_and_adapters_load_once(tiny_ckpt, out_dir, monkeypatch):
    loads = []
    real = app.load_pipeline
    monkeypatch.setattr(app, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    adapter_loads = []
    real_adapter = app.load_adapter
    monkeypatch.setattr(app, "load_adapter", lambda *a, **k: adapter_loads.append(a) or real_adapter(*a, **k))
    studio = app.Studio(tiny_ckpt, out_dir, device=CPU, precision="fp32")
    model = studio.model
    for w in (0.5, 1.0, -1.0, 2.0):
        assert app.apply_weights(studio, {"lora": w}) == {"lora": w}
        app.sample_grid(studio, tiny_settings(labels=(1,)), {"lora": w})
    studio.scan_adapters()  # nothing new: nothing read again
    assert len(loads) == 1 and len(adapter_loads) == 1 and studio.model is model


@pytest.mark.parametrize("weights, message", [
    ({"lora": 2.5}, "must be in -1..2"), ({"lora": float("nan")}, "must be in -1..2"),
    ({"lora": "x"}, "not a number"), ({"nope": 1.0}, "no loaded adapter named 'nope'")])
def test_bad_weights_are_refused(studio, weights, message):
    with pytest.raises(app.PageError, match=message):
        app.apply_weights(studio, weights)
    assert studio.adapters["lora"].weight == 0.0


@pytest.mark.parametrize("settings, message", [
    (dict(labels=()), "at least one label"), (dict(labels=(11,)), "labels must be in 0..9"),
    (dict(n_per_label=0), "samples per label"), (dict(n_per_label=1.5), "whole numbers"),
    (dict(seed=-1), "seed must be"), (dict(sampler="euler"), "sampler must be"),
    (dict(steps=0), "steps must be in 1..50"), (dict(steps=51), "steps must be in 1..50"),
    (dict(guidance=float("inf")), "guidance must be"), (dict(labels=("a",)), "whole numbers")])
def test_malformed_requests_are_page_errors(studio, settings, message):
    with pytest.raises(app.PageError, match=message):
        app.sample_grid(studio, tiny_settings(**settings))


def test_iter_sample_shows_estimates_then_the_grid(studio):
    items = list(app.iter_sample(studio, tiny_settings(labels=(2, 4)), {"lora": 1.0}, every=1))
    final = items[-1]
    assert isinstance(final, app.Grid)
    assert np.array_equal(final.images, app.sample_grid(studio, tiny_settings(labels=(2, 4)), {"lora": 1.0}).images)
    steps = [it for it in items[:-1]]
    assert [s for s, _, _ in steps] == list(range(1, TINY_STEPS))  # every step but the last, which is the grid
    assert all(total == TINY_STEPS and pic.shape == final.display[-pic.shape[0]:].shape or pic.ndim == 2
               for _, total, pic in steps)
    assert not np.array_equal(steps[0][2], final.display)  # an early estimate is not the result


def test_sweep_and_compare(studio):
    sweep = studio.sweep(tiny_settings(labels=(1, 2)), "lora")
    cell = (28 + 2) * app.UPSCALE
    assert sweep.shape[0] >= 2 * cell and sweep.shape[1] >= len(app.SWEEP_WEIGHTS) * cell
    with pytest.raises(app.PageError, match="move a slider first"):
        studio.compare(tiny_settings())
    both = studio.compare(tiny_settings(), {"lora": 1.0})
    half = both.shape[1] // 2
    assert not np.array_equal(both[:, :half - 20], both[:, -(half - 20):])
    assert studio.adapters["lora"].weight == 1.0  # the weights are as the sliders left them


def test_save_writes_grid_npz_and_settings_under_out_dir(studio, out_dir):
    grid = app.sample_grid(studio, tiny_settings(labels=(3,), seed=2), {"lora": 0.5})
    png, npz = studio.save(grid, "mine")
    assert png == str(out_dir / "app" / "mine.png") and np.array_equal(np.asarray(Image.open(png)), grid.picture)
    with np.load(npz) as f:
        assert np.array_equal(f["images"], grid.images.numpy()) and f["labels"].tolist() == [3]
        settings = json.loads(str(f["settings"]))
    assert settings["seed"] == 2 and settings["labels"] == [3] and settings["weights"] == {"lora": 0.5}
    for bad in ("../x", "a/b", "", "/etc/x"):
        with pytest.raises(app.PageError, match="letters, digits"):
            studio.save(grid, bad)
    with pytest.raises(app.PageError, match="sample a grid first"):
        studio.save(None, "x")


# ------------------------------------------------------------------ paths

def test_safe_path_refuses_paths_outside_its_folders(tmp_path):
    root, other = tmp_path / "out", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    (root / "link_out").symlink_to(other)
    (root / "link_in").symlink_to(root / "sub")
    roots = [str(root)]
    assert app.safe_path("sub/a.png", roots) == str(root / "sub" / "a.png")
    assert app.safe_path(str(root / "new"), roots) == str(root / "new")
    assert app.safe_path("link_in/a", roots) == str(root / "sub" / "a")  # a link that stays inside
    for bad in ("../other/a", "sub/../../other", str(other / "a"), "/etc/passwd", "link_out/a", "link_out",
                str(tmp_path / "out2"), "", "a\x00b"):
        with pytest.raises(app.PageError):
            app.safe_path(bad, roots)
    assert app.safe_path(str(other / "a"), [str(root), str(other)]) == str(other / "a")


def test_adapters_are_found_under_out_dir_and_lora_dirs_not_through_links(tiny_ckpt, tiny_adapter, tmp_path):
    out, extra, outside = tmp_path / "out", tmp_path / "shared", tmp_path / "outside"
    shutil.copytree(tiny_adapter, out / "styles" / "italic")
    shutil.copytree(tiny_adapter, extra / "lora")
    shutil.copytree(tiny_adapter, outside / "hidden")
    (out / "linked").symlink_to(outside)
    s = app.Studio(tiny_ckpt, out, [extra], device=CPU, precision="fp32")
    assert sorted(s.adapters) == ["lora", "styles/italic"]
    assert s.adapters["lora"].path == str(extra / "lora")
    entry = s.adapters["styles/italic"]
    assert entry.style == "italic" and entry.r == 2 and entry.size > 0 and entry.problem is None
    with pytest.raises(app.PageError, match="outside the folders"):
        s.add_adapter(str(outside / "hidden"))


def test_adapter_of_another_base_is_listed_with_its_reason(tiny_ckpt, tiny_adapter, tmp_path):
    from adapter import write_adapter

    out = tmp_path / "out"
    write_adapter(str(out / "other"), load_adapter(tiny_adapter).replace(base_fingerprint="0123456789abcdef"))
    s = app.Studio(tiny_ckpt, out, device=CPU, precision="fp32")
    assert s.usable() == [] and "0123456789abcdef" in s.adapters["other"].problem
    with pytest.raises(app.PageError, match="no loaded adapter"):
        s.apply_weights({"other": 1.0})


# ------------------------------------------------------------------ uploads

def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_labels_come_from_folder_or_file_name():
    assert app.label_from_name("7/a.png") == 7 and app.label_from_name("digits/3/x_9.png") == 3
    assert app.label_from_name("7_a.png") == 7 and app.label_from_name("4-b.jpg") == 4
    assert app.label_from_name("5.png") == 5
    assert app.label_from_name("a.png") is None and app.label_from_name("12_a.png") is None


def test_bad_uploads_are_named_and_nothing_is_trained(studio, tmp_path):
    (tmp_path / "3_bad.png").write_bytes(b"not an image")
    (tmp_path / "noname.png").write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    (tmp_path / "8_big.png").write_bytes(b"\0" * (app.MAX_FILE_BYTES + 1))
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.writestr("2/broken.png", b"\x89PNG\r\n\x1a\n broken")
        z.writestr("2/notes.txt", b"hello")
    (tmp_path / "junk.zip").write_bytes(b"PK nothing")
    files = [str(tmp_path / n) for n in ("3_bad.png", "noname.png", "8_big.png", "set.zip", "junk.zip")]
    up = app.read_uploads(files)
    text = "\n".join(up.bad)
    for name in ("3_bad.png", "noname.png: no label", "8_big.png: larger than", "set.zip/2/broken.png",
                 "set.zip/2/notes.txt: not an image", "junk.zip: not a readable zip"):
        assert name in text
    with pytest.raises(app.PageError, match="nothing is trained.*3_bad.png"):
        app.start_finetune(studio, up, "mine")
    assert studio.job is None and not os.path.exists(studio.out_dir + "/app/adapters/mine")


def test_upload_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "MAX_UPLOAD_FILES", 3)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as z:
        for i in range(4):
            z.writestr(f"1/{i}.png", b"x")
    with pytest.raises(app.PageError, match="more than 3 files"):
        app.read_uploads([str(tmp_path / "many.zip")])
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 1000)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("1/a.png", b"\0" * 100_000)  # a few hundred bytes packed, 100 KB unpacked
    with pytest.raises(app.PageError, match="unpacks to over"):
        app.read_uploads([str(tmp_path / "bomb.zip")])


def digit_files(folder, count=8):
    """PNG digits drawn dark on light, as a phone photo or a scan gives them, labelled by folder and by name."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        arr = np.full((56, 56), 240, np.uint8)
        arr[10:46, 24 + i % 3:30 + i % 3] = rng.integers(0, 40)  # a dark vertical stroke: a 1
        name = folder / (f"1_{i}.png" if i % 2 else f"x{i}.png")
        name.write_bytes(png_bytes(arr))
        paths.append(str(name))
    with zipfile.ZipFile(folder / "more.zip", "w") as z:
        for i, p in enumerate(paths[::2]):
            z.write(p, f"7/{i}.png")
    return [p for p in paths if "/1_" in p] + [str(folder / "more.zip")]


def test_a_sketch_becomes_a_digit():
    canvas = np.zeros((280, 280, 4), np.uint8)  # the Sketchpad's layers: transparent, a black stroke drawn on it
    assert app.sketch_to_image({"composite": canvas}) is None  # nothing drawn
    canvas[60:220, 130:150] = (0, 0, 0, 255)
    img = app.sketch_to_image({"composite": canvas, "layers": [], "background": None})
    digit = app._preprocess(img, "drawn #1")
    assert digit.shape == (28, 28) and digit[:, 13:15].mean() > 100 and digit[:, :5].max() == 0  # bright ink, dark paper


def test_uploads_become_training_data(studio, tmp_path):
    files = digit_files(tmp_path)
    sketch = np.full((80, 80), 255, np.uint8)
    sketch[20:60, 30:50] = 0
    blank = np.full((80, 80), 255, np.uint8)
    up = app.read_uploads(files, drawn=[(4, Image.fromarray(sketch)), (5, Image.fromarray(blank))])
    assert up.bad == ["drawn #2 has no ink (its brightest stroke is 0 grey levels from its paper): remove it, or "
                      "rescan it darker"]
    up.bad = []
    assert up.images.shape == (len(up), 28, 28) and up.images.dtype == np.uint8
    assert sorted(set(up.labels.tolist())) == [1, 4, 7] and up.names[-1] == "drawn #1"
    npz, preview = app.prepare_style_data(studio, up, "mine")
    with np.load(npz) as f:
        assert np.array_equal(f["images"], up.images) and np.array_equal(f["labels"], up.labels)
    assert os.path.getsize(preview) > 0 and npz.startswith(studio.out_dir)


# ------------------------------------------------------------------ the fine-tune process

def sleeper(tmp_path, seconds=60):
    return app.FineTune([sys.executable, "-c", f"import time; time.sleep({seconds})"], str(tmp_path / "x"),
                        str(tmp_path / "x.log"))


def test_one_finetune_at_a_time_and_stop_leaves_no_process(studio, tmp_path):
    studio.job = sleeper(tmp_path)
    pid = studio.job.proc.pid
    assert studio.job.running()
    with pytest.raises(app.PageError, match="already running"):
        app.start_finetune(studio, app.Upload(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), [], []), "b")
    studio.close()
    assert not studio.job.running() and not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def _gone(pid, timeout, poll):
    """Whether process ``pid`` has ended (or is a zombie) within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while os.path.exists(f"/proc/{pid}") and not _zombie(pid) and time.time() < deadline:
        time.sleep(poll)
    return not os.path.exists(f"/proc/{pid}") or _zombie(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_finetune_child_dies_with_the_server(tmp_path):
    """kill -9 of the server (no atexit, no page) still ends the fine-tune it started."""
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import app\n"
            f"job = app.FineTune([sys.executable, '-c', 'import time; time.sleep(120)'], {str(tmp_path / 'x')!r}, "
            f"{str(tmp_path / 'x.log')!r})\nprint(job.proc.pid, flush=True)\ntime.sleep(120)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert _gone(child, 10, 0.1)
    finally:
        server.kill()
        server.wait()


def test_finetune_progress_is_read_from_its_log(tmp_path):
    script = ("import sys, time\n"
              "for i in range(1, 4):\n"
              "    sys.stderr.write(f'\\rlora:  {i * 33}%|###| {i}/3 [00:01<00:00, epoch=1, loss=0.{i}234, lr=1e-2]')\n"
              "    sys.stderr.flush(); time.sleep(0.05)\n")
    job = app.FineTune([sys.executable, "-c", script], str(tmp_path / "x"), str(tmp_path / "x.log"))
    job.thread.join(30)
    st = job.status()
    assert st["done"] and st["ok"] and (st["step"], st["steps"], st["loss"]) == (3, 3, 0.3234)


@pytest.mark.slow
def test_finetune_from_uploads_writes_a_loadable_adapter(studio, tmp_path):
    up = app.read_uploads(digit_files(tmp_path))
    job = app.start_finetune(studio, up, "mine", steps=2)
    job.thread.join(300)
    st = job.status()
    assert st["ok"], open(job.log_path).read()[-2000:]
    assert st["step"] == st["steps"] == 2 and st["loss"] is not None
    (entry,) = app.finish_finetune(studio)
    assert entry.name == "app/adapters/mine" and entry.problem is None
    assert load_adapter(job.out)  # loads on its own, too
    base = app.sample_grid(studio, tiny_settings())
    assert not np.array_equal(app.sample_grid(studio, tiny_settings(), {entry.name: 2.0}).images, base.images)


# ------------------------------------------------------------------ command line

def test_main_refuses_bad_input_with_one_line(tmp_path, capsys):
    for argv, message in ((["--ckpt", str(tmp_path / "none.pt")], "not found"),
                          (["--port", "70000"], "--port must be <= 65535"),
                          (["--lora-dir", str(tmp_path / "nowhere")], "is not a folder")):
        with pytest.raises(SystemExit) as e:
            app.main([*argv, "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_import_does_no_work(tmp_path):
    """Importing the page writes nothing, prints nothing and leaves Gradio unloaded (the functions need none)."""
    code = "import sys, app; assert 'gradio' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_defaults_are_safe():
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 7860


def test_bench_entry_returns_its_figures(studio):
    out = app.bench_entry(studio, repeats=1)
    assert set(out) == {"first_grid_s", "redraw_s", "adapters"} and out["adapters"] == 1


# ------------------------------------------------------------------ the page in a browser

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                # without these Chromium waits on network services an offline machine never answers
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_candidates():
    return ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
            shutil.which("google-chrome")]


def find_browser(candidates=None):
    """(playwright's sync_playwright, a Chromium executable), or a skip; a failure where CI is set."""
    def missing(why):
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {why}")
        pytest.skip(why)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -r requirements-dev.txt)")
    for path in browser_candidates() if candidates is None else candidates:
        if path and os.path.exists(path):
            return sync_playwright, path
    missing("no Chromium found (apt-get install chromium)")


def test_a_missing_browser_is_a_skip_here_and_a_failure_in_ci(monkeypatch):
    pytest.importorskip("playwright")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium found"):
        find_browser(candidates=[])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        find_browser(candidates=[])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url, proc):
        self.url, self.proc = url, proc

    def children(self):
        """Process ids the server started (its fine-tunes)."""
        pids = []
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return [p for p in pids if not _zombie(p)]


@pytest.fixture
def server(tiny_ckpt, out_dir):
    """``python app.py`` on the tiny checkpoint, on a free loopback port, stopped afterwards."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--ckpt", str(tiny_ckpt), "--out-dir",
                             str(out_dir), "--port", str(port), "--preset", "tiny", "--device", "cpu",
                             "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=str(out_dir.parent))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"app.py did not start: {proc.stdout.read()}")
                time.sleep(0.5)
        yield Server(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_page_end_to_end_in_chromium(server, studio, tmp_path):
    sync_playwright, chromium = find_browser()
    url = server.url
    (tmp_path / "3_bad.png").write_bytes(b"not an image")
    (tmp_path / "7_notes.png").write_bytes(b"hello")
    outside = []

    def route(r):
        url = r.request.url
        if url.startswith(server.url) or url.startswith(("data:", "blob:")):
            r.continue_()
        else:  # the page must work with no network: nothing from a CDN
            outside.append(url)
            r.abort()

    def shown(page):
        src = page.locator("#grid img").get_attribute("src")
        body = page.request.get(src if src.startswith("http") else url + src).body()
        return np.asarray(Image.open(io.BytesIO(body)))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.route("**/*", route)
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            slider = page.locator("#weight_0 input[type=number]")
            slider.wait_for(timeout=120_000)
            for d in range(10):
                if d != 3:
                    page.locator(f"#labels input[name='{d}']").uncheck()
            page.locator("#sample").click()
            status = page.locator("#status")
            page.wait_for_function("document.querySelector('#status').innerText.includes('done')", timeout=120_000)
            first = shown(page)
            expected = app.sample_grid(studio, tiny_settings(labels=(3,)))
            assert np.array_equal(first, expected.display)
            slider.fill("1.5")
            slider.blur()  # a slider's release redraws with the new weight
            page.wait_for_function("document.querySelector('#status').innerText.includes('lora 1.5')",
                                   timeout=120_000)
            moved = shown(page)
            assert not np.array_equal(moved, first), status.inner_text()
            assert np.array_equal(moved, app.sample_grid(studio, tiny_settings(labels=(3,)), {"lora": 1.5}).display)
            page.locator("#uploads input[type=file]").set_input_files([str(tmp_path / "3_bad.png"),
                                                                      str(tmp_path / "7_notes.png")])
            page.get_by_text("7_notes").first.wait_for(timeout=60_000)
            page.locator("#check").click()
            error = page.get_by_text("nothing is trained").first
            error.wait_for(timeout=60_000)
            assert "3_bad.png" in error.inner_text() and "7_notes.png" in error.inner_text()
            assert outside == []
            page.locator("#seed input").fill("1")  # the server serves on: a new seed, a new grid
            page.locator("#sample").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('done')", timeout=120_000)
            if os.environ.get("SAVE_SCREENSHOT"):
                page.screenshot(path=os.path.join(ROOT, "docs", "app.png"), full_page=True)
        finally:
            browser.close()
    # requests no page would send: each refused in one line, and the page goes on serving
    from gradio_client import Client

    client = Client(url, verbose=False)
    good = (["3"], 1, 0, "ddim", TINY_STEPS, 2.0, 0.0)
    for bad, message in (((["x"], *good[1:]), "not in the list of choices"), (([], *good[1:]), "at least one label"),
                         ((*good[:-1], 7.0), "greater than maximum"), ((*good[:3], "euler", *good[4:]), "euler")):
        with pytest.raises(Exception, match=message) as e:
            client.predict(*bad, api_name="/do_sample")
        assert "Traceback" not in str(e.value)
    path, note = client.predict(*good, api_name="/do_sample")
    assert np.array_equal(np.asarray(Image.open(path)), expected.display) and note.startswith("done")


@pytest.mark.slow
def test_page_fine_tune_lists_the_adapter_and_closing_the_page_stops_it(server, tmp_path):
    sync_playwright, chromium = find_browser()
    files = digit_files(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            page.locator("#weight_0 input[type=number]").wait_for(timeout=120_000)
            page.locator("#uploads input[type=file]").set_input_files(files)
            page.locator("#uploads").get_by_text("more", exact=True).first.wait_for(timeout=60_000)
            page.locator("#style_name input, #style_name textarea").first.fill("mine")
            page.locator("#ft_steps input").fill("2")
            page.locator("#train").click()
            page.get_by_text("is in the list above").first.wait_for(timeout=300_000)
            assert "app/adapters/mine" in page.locator("#weight_1").inner_text()
            assert server.children() == []  # done: nothing left running
            # a long one, then the page goes away: its fine-tune goes with it
            page.locator("#style_name input, #style_name textarea").first.fill("long")
            page.locator("#ft_steps input").fill("100000")
            page.locator("#train").click()
            page.locator("#style_msg").get_by_text("app/adapters/long").wait_for(timeout=60_000)
            (child,) = server.children()
            page.close()
            assert _gone(child, 120, 0.5)
        finally:
            browser.close()


def test_bench_times_the_first_grid_and_a_redraw_and_serves_nothing(tiny_ckpt, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert app.main(["--ckpt", str(tiny_ckpt), "--out-dir", str(out_dir), "--preset", "tiny", "--device", "cpu",
                     "--precision", "fp32", "--bench"]) is None
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["first_grid_s"] > 0 and figures["redraw_s"] > 0 and figures["precision"] == "fp32"
    assert not os.path.exists(out_dir / "app")  # nothing written: no grids, no uploads folder
