"""What the page's buttons call: each handler takes the values the page sent, checks them as sent, calls the
rooms (studio.py, uploads.py, jobs.py) and returns what the widgets show. app.py lays the widgets out and wires
them here; Gradio is imported only inside a handler, so this module loads without it.

    handler(do_sample, page, panel=2, outputs=3)   # bound to the page; a refusal is a line in output 2 and a pop-up

A refusal (any UserError) is one line: in the panel's own message line, where it stays until that panel's
next action, and in a pop-up (gr.Warning) that fades. It never raises out of the handler, so the other
outputs keep what they showed.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import time

from config import WEIGHT_RANGE, SampleConfig, from_saved, preset_config
from errors import UserError
from jobs import Runner, shown_command
from studio import (APP_DIR, FAST_STEPS, MAX_IMAGE_BYTES, Grid, PageError, Studio, check_labels, check_name,
                    iter_sample, number, shown, weights_text)
from uploads import read_uploads, sketch_to_image, write_style_data

MAX_SLOTS = 12  # weight sliders on the page; adapters beyond these are listed but have none
SAMPLE_FIELDS = 6  # labels, samples per label, seed, sampler, steps, guidance: the first inputs of a sample
MAX_DRAWINGS = 500  # drawings one tab may hold: a label and a 28x28 digit each, ten times a page's fine-tune
ERROR_MARK = "**Refused:** "  # how a panel's message line starts when it shows a refusal


@dataclasses.dataclass
class Page:
    """What every visitor's page shares: the model and adapters, and the one fine-tune the server runs."""
    studio: Studio
    runner: Runner

    @property
    def styles_dir(self):
        return os.path.join(self.studio.out_dir, APP_DIR, "styles")


def one_line(text):
    return " ".join(str(text).split())


def _skip():
    import gradio as gr

    return gr.skip()


# ------------------------------------------------------------------ Sample

def _request(page, values):
    """The sample settings the page sent, checked as sent; a missing one is refused (None is not "the default")."""
    fields = ("labels", "samples per label", "seed", "sampler", "steps", "guidance")
    missing = [f for f, v in zip(fields, values) if v is None] + list(fields[len(values):])
    if missing:
        raise PageError(f"{missing[0]} is missing; reload the page")
    return page.studio.request(*values[:SAMPLE_FIELDS])


def _weights(names, values):
    """{name: weight} from the tab's sliders; ``names`` (the tab's state) says which adapter each one shows."""
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise PageError(f"the slider names must be a list of adapter names, got {shown(names)}; reload the page")
    values = [number(v, f"weight slider {i + 1}", *WEIGHT_RANGE) for i, v in enumerate(values)]
    return dict(zip(names or [], values))


def do_sample(page, names, *values):
    """The estimate every few steps, then the grid; the grid also goes into the tab's state (for Save)."""
    req, weights = _request(page, values), _weights(names, values[SAMPLE_FIELDS:])
    t = time.perf_counter()
    for item in iter_sample(page.studio, req, weights):
        if isinstance(item, Grid):
            yield item.display, item, (f"done in {time.perf_counter() - t:.1f} s, "
                                       f"{weights_text(item.settings['weights'])}")
        else:
            step, total, picture = item
            yield picture, _skip(), f"denoising: step {step} of {total}"


def do_fast(page, names, on, *values):
    """The fast switch: on, the speed adapter's slider at 1 and lcm at FAST_STEPS; off, every speed adapter's
    slider at 0 and the preset's sampler and steps. Then the grid again, every other slider as it was; the
    switch's settings go back to their widgets, where they can be changed by hand."""
    if not isinstance(on, bool):
        raise PageError(f"the fast switch must be on or off, got {shown(on)}; reload the page")
    _request(page, values)
    weights = _weights(names, values[SAMPLE_FIELDS:])
    studio = page.studio
    if on:
        speed = studio.speed_adapter()
        if speed.name not in weights:
            raise PageError(f"the speed adapter {speed.where} has no slider here; press Look for new adapters")
        sampler, steps = "lcm", FAST_STEPS
    else:
        defaults = preset_config(SampleConfig, studio.preset)
        sampler, steps = defaults.sampler, min(defaults.steps, studio.timesteps)
    speed_names = {e.name for e in studio.speed_adapters()}
    slots = [float(w) for w in values[SAMPLE_FIELDS:]]
    for i, name in enumerate((names or [])[:len(slots)]):
        if name in speed_names:
            slots[i] = 1.0 if on and name == speed.name else 0.0
    form = [*values[:3], sampler, steps, values[5], *slots]
    for item in do_sample(page, names, *form):
        yield (*item, sampler, steps, *slots)


def do_save(page, grid, name):
    png, npz = page.studio.save(grid, name)
    return f"saved `{os.path.relpath(png, page.studio.out_dir)}` (labelled, its settings inside) and " \
           f"`{os.path.relpath(npz, page.studio.out_dir)}`"


# ------------------------------------------------------------------ Adapters

def do_sweep(page, names, pick, *values):
    """The sweep's picture after each column, with a line saying how far it is."""
    req, weights = _request(page, values), _weights(names, values[SAMPLE_FIELDS:])
    t = time.perf_counter()
    for i, picture in enumerate(page.studio.iter_sweep(req, pick, weights), 1):
        yield f"weight sweep of `{pick}`: column {i} done, {time.perf_counter() - t:.1f} s", picture


def do_compare(page, names, *values):
    picture = page.studio.compare(_request(page, values), _weights(names, values[SAMPLE_FIELDS:]))
    return "the base (left) against the adapters at this tab's weights (right), on the same noise", picture


def adapter_note(studio):
    usable = studio.usable()
    lines = [] if usable else ["No adapter found under the page's folders yet: fine-tune one in *Your style*, or "
                               "start the page with `--lora-dir FOLDER`."]
    if len(usable) > MAX_SLOTS:
        lines.append(f"{len(usable) - MAX_SLOTS} more adapter(s) have no slider: "
                     + ", ".join(e.name for e in usable[MAX_SLOTS:]))
    lines += [f"- `{e.where}` not loaded: {e.problem}" for e in studio.adapters.values() if e.problem]
    return "\n".join(lines)


def do_refresh(page):
    """The sliders, the note and the sweep's choices for the adapters listed now; the tab's slot names."""
    import gradio as gr

    page.studio.scan_adapters(skip=[page.runner.writing()] if page.runner.writing() else [])
    entries = page.studio.usable()[:MAX_SLOTS]
    names = [e.name for e in entries]
    # a shown slider keeps the value this tab gave it: adapters are only ever added, after those listed
    slots = [gr.update(visible=True, label=e.name, info=e.describe()) for e in entries]
    slots += [gr.update(visible=False, value=0.0)] * (MAX_SLOTS - len(entries))
    return [*slots, adapter_note(page.studio), gr.update(choices=names, value=names[0] if names else None), names]


def do_add_path(page, path):
    entry = page.studio.add_adapter(path)
    return [f"added `{entry.where}`", *do_refresh(page)]


# ------------------------------------------------------------------ Your style

def _drawings(drawn):
    """This tab's drawings as its state holds them: a list of (label 0..9, PIL image); a PageError otherwise."""
    from PIL import Image

    if drawn is None:
        return []
    if not isinstance(drawn, list) or not all(isinstance(d, (tuple, list)) and len(d) == 2 and type(d[0]) is int
                                              and 0 <= d[0] <= 9 and isinstance(d[1], Image.Image) for d in drawn):
        raise PageError(f"the drawings must be a list of (label, image), got {shown(drawn)}; reload the page")
    return drawn


def do_add_drawing(page, value, label, drawn):
    """The sketch as one more of this tab's drawings, labelled. The sketchpad is emptied by the page itself
    (app.CLEAR_SKETCH): a None sent back to it left it without a canvas, ignoring the next strokes."""
    (label,) = check_labels([label], 10)
    drawn = _drawings(drawn)
    if len(drawn) >= MAX_DRAWINGS:
        raise PageError(f"{MAX_DRAWINGS} drawings already; fine-tune on these or clear them")
    img = sketch_to_image(value)
    if img is None:
        raise PageError("the sketchpad is empty: draw a digit first")
    drawn = [*drawn, (label, img)]
    counts = [sum(1 for d, _ in drawn if d == k) for k in range(10)]
    return drawn, f"{len(drawn)} drawing(s) added (" + ", ".join(f"{k}: {c}" for k, c in enumerate(counts) if c) \
        + ")"


def do_clear(page):
    return [], "drawings cleared"


def _uploads(files, drawn):
    """The uploads Gradio sent (its file records: a cached path and the name on the visitor's machine), read."""
    if files is None:
        files = []
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                              for f in files):
        raise PageError(f"uploads must be a list of files, got {shown(files)}")
    drawn = _drawings(drawn)
    named = [(f.get("orig_name") if isinstance(f.get("orig_name"), str) else os.path.basename(f["path"]), f["path"])
             for f in files]
    return read_uploads(named, drawn)


def do_check(page, files, drawn, name):
    name = check_name(name, "adapter name")
    up = _uploads(files, drawn)
    _, preview = write_style_data(up, page.styles_dir, name)
    return (f"{len(up)} images ready: " + ", ".join(f"{d}: {c}" for d, c in enumerate(up.counts()) if c), preview)


def stopped_note(page):
    """The fine-tunes stopped part-way, one a line, and the names the Resume dropdown offers."""
    import gradio as gr

    runs = page.runner.stopped()
    text = "\n".join(f"- `{r.name}`: stopped at {r.step} of {r.steps}" for r in runs)
    names = [r.name for r in runs]
    return text, gr.update(choices=names, value=names[0] if names else None)


def _follow(page, job):
    """The fine-tune's progress every second until it ends; then the base against the new adapter (did it
    work?), its loss curve, the adapter list and the stopped runs. Yields the outputs of do_train."""
    skip = [_skip()] * (MAX_SLOTS + 3)
    while job.running():
        time.sleep(1.0)
        p = job.progress()
        yield _skip(), _skip(), p.html(), p.previews[-1] if p.previews else _skip(), _skip(), _skip(), _skip(), \
            *skip
    job.thread.join(5)
    p = job.progress()
    listed = do_refresh(page)
    where = os.path.relpath(job.out, page.studio.out_dir)
    result, curve = _skip(), p.curve or _skip()
    if p.ok:
        msg = f"done: adapter `{where}` has a slider now"
        name = next((e.name for e in page.studio.usable() if e.path == os.path.realpath(job.out)), None)
        if name is not None:
            result = page.studio.compare(page.studio.request(), {name: 1.0})
    elif p.step < p.steps and p.stopped:
        msg = f"`{where}` stopped at {p.step} of {p.steps}: Resume carries on"
    else:
        msg = f"the fine-tune stopped (exit code {p.returncode}): " + " / ".join(p.tail)
    yield msg, _skip(), p.html(), result, curve, *stopped_note(page), *listed


def do_train(page, files, drawn, name, steps, session=None):
    """Start the fine-tune, then follow it (_follow)."""
    name = check_name(name, "adapter name")
    state = {}

    def prepare():
        state["npz"], state["preview"] = write_style_data(_uploads(files, drawn), page.styles_dir, name)
        return state["npz"]

    job = page.runner.start(name, steps, prepare, session=session)
    yield (f"fine-tune started: `{shown_command(job.cmd)}`", state["preview"], *[_skip()] * (5 + MAX_SLOTS + 3))
    yield from _follow(page, job)


def do_resume(page, name, session=None):
    """Carry on a fine-tune stopped part-way (lora_finetune.py --resume), then follow it."""
    if not isinstance(name, str) or not name:
        raise PageError(f"pick a stopped fine-tune to resume (got {shown(name)})")
    job = page.runner.resume(check_name(name, "adapter name"), session=session)
    yield (f"resumed: `{shown_command(job.cmd)}`", *[_skip()] * (6 + MAX_SLOTS + 3))
    yield from _follow(page, job)


def do_stop(page):
    return "stopping the fine-tune at its next step" if page.runner.stop() else "no fine-tune is running"


# ------------------------------------------------------------------ From a digit, and settings from a PNG

def do_img2img(page, names, value, upload, label, strength, *values):
    """Your digit (drawn, else uploaded) noised to ``strength`` and denoised towards ``label`` through this tab's
    adapters (SDEdit, Studio.img2img), with the Sample tab's seed, sampler, steps and guidance; the input beside
    the result."""
    image = sketch_to_image(value)
    if image is None and upload is not None:
        if not isinstance(upload, str) or not os.path.isfile(upload):
            raise PageError(f"the uploaded digit must be a file, got {shown(upload)}")
        with open(upload, "rb") as f:  # Gradio's copy of the upload, under the page's folder
            image = f.read(MAX_IMAGE_BYTES + 1)  # Studio.img2img refuses one over its limit
    if image is None:
        raise PageError("draw a digit or upload one first")
    if isinstance(label, (int, float)) and not isinstance(label, bool) or isinstance(label, str):
        label = [label]
    req = _request(page, [label, 1, *values[2:SAMPLE_FIELDS]])
    weights = _weights(names, values[SAMPLE_FIELDS:])
    t = time.perf_counter()
    grid = page.studio.img2img(image, req, strength, weights)
    return (f"done in {time.perf_counter() - t:.1f} s, strength {grid.settings['strength']:g}, "
            f"{weights_text(grid.settings['weights'])}", grid.display)


PAGE_SAMPLE = ("sampler", "steps", "guidance")  # the sampler's settings the Sample tab has a widget for


def not_on_the_page(sample, defaults):
    """The PNG's sampler settings (its JSON's "sample", read as denoise.py reads it: config.from_saved) that the
    page has no widget for and that differ from the page's own ``defaults``: "name value (here value)" each."""
    try:
        theirs = from_saved(SampleConfig, sample)
    except (TypeError, ValueError) as e:
        raise PageError(f"the dropped PNG's sampler settings are wrong ({e}); drop one denoise.py or the page "
                        f"saved") from None
    return [f"{f.name} {sample.get(f.name, getattr(theirs, f.name))} (here {getattr(defaults, f.name)})"
            for f in dataclasses.fields(SampleConfig)
            if f.name not in PAGE_SAMPLE and getattr(theirs, f.name) != getattr(defaults, f.name)]


def do_png_info(page, names, path):
    """The settings a dropped PNG carries (one denoise.py or the page saved) back on the Sample tab's widgets, and
    each adapter it names that this tab has a slider for at its weight."""
    from pictures import read_png_settings

    if not isinstance(path, str):
        raise PageError(f"drop a PNG that denoise.py or the page saved (got {shown(path)})")
    s = read_png_settings(path, flag="the dropped PNG")
    labels = [str(v) for v in check_labels(s["labels"].split(","), page.studio.num_classes)]
    sample = s["sample"]
    by_path = {page.studio.adapters[n].path: n for n in names or [] if n in page.studio.adapters}
    weights, unknown = {}, []
    for spec in s["lora"]:
        where, _, w = spec.rpartition(":")
        name = by_path.get(os.path.realpath(where)) if where else None
        if name is None:
            unknown.append(spec)
        else:
            weights[name] = float(w)
    slots = [weights.get(n, 0.0) for n in names or []]
    slots += [_skip()] * (MAX_SLOTS - len(slots))
    note = f"; not listed here: {', '.join(unknown)}" if unknown else ""
    differ = not_on_the_page(sample, preset_config(SampleConfig, page.studio.preset))
    if differ:
        note += (f"; this page has no control for {', '.join(differ)}, and draws with its own: `python denoise.py "
                 f"--from-png {os.path.basename(path)}` redraws it exactly")
    return (f"settings of `{os.path.basename(path)}` back: seed {s['seed']}, {sample.get('sampler')}, "
            f"{weights_text(weights)}{note}", labels, s["n_per_label"], s["seed"], sample.get("sampler"),
            sample.get("steps"), sample.get("guidance"), *slots)


# ------------------------------------------------------------------ binding a handler to the page

def _refusal(message, outputs, panel):
    """What a refused call shows: the message in output ``panel``, every other output as it was."""
    import gradio as gr

    gr.Warning(message)
    line = ERROR_MARK + message
    if outputs == 1:
        return line
    return tuple(line if i == panel else gr.skip() for i in range(outputs))


def handler(fn, page, session=False, panel=0, outputs=1):
    """``fn`` bound to ``page`` as Gradio calls it: a refusal (any UserError) is one line in output ``panel`` of
    its ``outputs`` and a pop-up, never a traceback. With ``session``, Gradio passes the request last (it finds it
    by the signature) and the tab's session id goes on to ``fn`` (the fine-tune it starts stops when that tab
    goes away)."""
    import gradio as gr

    def bound(args):
        if not session:
            return (page, *args), {}
        return (page, *args[:-1]), {"session": getattr(args[-1], "session_hash", None)}

    if inspect.isgeneratorfunction(fn):
        def call(*args):
            a, kw = bound(args)
            try:
                yield from fn(*a, **kw)
            except UserError as e:
                yield _refusal(one_line(e), outputs, panel)
    else:
        def call(*args):
            a, kw = bound(args)
            try:
                return fn(*a, **kw)
            except UserError as e:
                return _refusal(one_line(e), outputs, panel)
    call.__name__ = fn.__name__
    if session:
        params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("page", "session")]
        request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
        call.__signature__ = inspect.Signature([*params, request])
        call.__annotations__ = {"request": gr.Request}
    return call


# ------------------------------------------------------------------ a slider moved: the open tab's picture again

def do_slider_sample(page, tab, names, *values):
    """A weight slider released while the Sample tab is open: the grid again (elsewhere nothing is drawn)."""
    if tab != "sample":
        yield _skip(), _skip(), _skip()
        return
    yield from do_sample(page, names, *values)


def do_slider_img2img(page, tab, *args):
    """A weight slider released while From a digit is open and holds a digit: the result again."""
    if tab != "digit":
        return _skip(), _skip()
    return do_img2img(page, *args)
