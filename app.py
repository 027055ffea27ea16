"""A local web page to play with the model: sample digits, mix adapters, fine-tune an adapter on your own digits.

    python app.py                                   # http://127.0.0.1:7860: out/ckpt.pt and every adapter under out/
    python app.py --lora-dir ~/adapters --port 7861 # also list the adapters in another folder
    python app.py --host 0.0.0.0                    # reachable from other machines (loopback only by default)

Three parts, on one page (Gradio, served from this machine; nothing is fetched from the internet):
    Sample        labels, samples per label, seed, sampler, steps, guidance: the grid shows the current x0 estimate
                  as it denoises, then the final grid, the same one `denoise.py` gives for the same settings and
                  seed (a column per label); "Save" writes its .png and .npz (with the settings) under --out-dir
    Adapters      every adapter under --out-dir and --lora-dir, each with a weight slider and its style, rank and
                  size; several at once, as `denoise.py --lora A:w --lora B:w`; a weight sweep of one adapter,
                  and the base against the adapters on the same noise
    Your style    images or a zip labelled by folder or file name (7/a.png, 7_a.png: as `--data` reads them), or
                  digits drawn on the page; shows what the model will train on, then runs `lora_finetune.py
                  --data` in the background (one at a time), with its progress, and lists the new adapter

This file is the command line and the page's layout; what the page does lives in studio.py (the model and its
adapters), uploads.py (your digits) and jobs.py (the fine-tune), with no Gradio in them. The model and the
adapters are loaded once; what a visitor chose (weights, grid, drawings) lives in that tab's state. Every
handler checks what it was sent as sent (Gradio's own rounding is off), and a refusal is one line on the page.
The page reads and writes only under --out-dir and the --lora-dir folders.
"""

import dataclasses
import json
import os
import time

from cli import ArgumentParser, add_preset_arg, add_runtime_args, bounded, path_arg, runtime_from_args
from config import DEFAULT_CKPT, DEFAULT_OUT_DIR, WEIGHT_RANGE, LoraConfig, SampleConfig, preset_config
from errors import UserError, run_main
from jobs import Runner, shown_command
from runtime import pick_device, resolve_precision
from studio import (APP_DIR, MAX_PER_LABEL, Grid, PageError, Studio, bench_entry, check_labels, check_name,
                    iter_sample, number, shown, weights_text)
from uploads import IMAGE_EXTS, MAX_UPLOAD_BYTES, read_uploads, sketch_to_image, write_style_data

DEFAULT_PORT = 7860
MAX_SLOTS = 12  # weight sliders on the page; adapters beyond these are listed but have none
# The sliders show -1..2, where an adapter's effect reads well (below 0 its style is reversed, past 2 the digits
# break up); what a request may send is the one range an adapter's weight has everywhere, config.WEIGHT_RANGE.
SLIDER_SPAN = (-1.0, 2.0)
SAMPLE_FIELDS = 6  # labels, samples per label, seed, sampler, steps, guidance: the first inputs of a sample


@dataclasses.dataclass
class Page:
    """What every visitor's page shares: the model and adapters, and the one fine-tune the server runs."""
    studio: Studio
    runner: Runner

    @property
    def styles_dir(self):
        return os.path.join(self.studio.out_dir, APP_DIR, "styles")


# ------------------------------------------------------------------ handlers: what the page's buttons call

def one_line(text):
    return " ".join(str(text).split())


def _request(page, values):
    """The sample settings the page sent, checked as sent; a missing one is refused (None is not "the default")."""
    fields = ("labels", "samples per label", "seed", "sampler", "steps", "guidance")
    missing = [f for f, v in zip(fields, values) if v is None] + list(fields[len(values):])
    if missing:
        raise PageError(f"{missing[0]} is missing; reload the page")
    return page.studio.request(*values[:SAMPLE_FIELDS])


def _weights(names, values):
    """{name: weight} from the tab's sliders; ``names`` (the tab's state) says which adapter each one shows."""
    values = [number(v, f"weight slider {i + 1}", *WEIGHT_RANGE) for i, v in enumerate(values)]
    return dict(zip(names or [], values))


def do_sample(page, names, *values):
    """The estimate every few steps, then the grid; the grid also goes into the tab's state (for Save)."""
    import gradio as gr

    req, weights = _request(page, values), _weights(names, values[SAMPLE_FIELDS:])
    t = time.perf_counter()
    for item in iter_sample(page.studio, req, weights):
        if isinstance(item, Grid):
            yield item.display, item, (f"done in {time.perf_counter() - t:.1f} s, "
                                       f"{weights_text(item.settings['weights'])}")
        else:
            step, total, picture = item
            yield picture, gr.skip(), f"denoising: step {step} of {total}"


def do_save(page, grid, name):
    png, npz = page.studio.save(grid, name)
    return f"saved {png} and {npz}"


def do_sweep(page, names, pick, *values):
    return page.studio.sweep(_request(page, values), pick, _weights(names, values[SAMPLE_FIELDS:]))


def do_compare(page, names, *values):
    return page.studio.compare(_request(page, values), _weights(names, values[SAMPLE_FIELDS:]))


def adapter_note(studio):
    usable = studio.usable()
    lines = [] if usable else ["No adapter found under the page's folders yet: fine-tune one below, or start the "
                               "page with `--lora-dir FOLDER`."]
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
    page.studio.add_adapter(path)
    return do_refresh(page)


def do_add_drawing(page, value, label, drawn):
    (label,) = check_labels([label], 10)
    if not isinstance(drawn, list):
        drawn = []
    img = sketch_to_image(value)
    if img is None:
        raise PageError("the sketchpad is empty: draw a digit first")
    drawn = [*drawn, (label, img)]
    return drawn, f"{len(drawn)} drawing(s) added", None


def do_clear(page):
    return [], "drawings cleared"


def _uploads(files, drawn):
    """The uploads Gradio sent (its file records: a cached path and the name on the visitor's machine), read."""
    if files is None:
        files = []
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                              for f in files):
        raise PageError(f"uploads must be a list of files, got {shown(files)}")
    named = [(f.get("orig_name") if isinstance(f.get("orig_name"), str) else os.path.basename(f["path"]), f["path"])
             for f in files]
    return read_uploads(named, drawn if isinstance(drawn, list) else [])


def do_check(page, files, drawn, name):
    name = check_name(name, "adapter name")
    up = _uploads(files, drawn)
    _, preview = write_style_data(up, page.styles_dir, name)
    return (f"{len(up)} images ready: " + ", ".join(f"{d}: {c}" for d, c in enumerate(up.counts()) if c), preview)


def do_train(page, files, drawn, name, steps, session=None):
    """Start the fine-tune, then its progress every second until it ends; the adapter list refreshed at the end."""
    import gradio as gr

    name = check_name(name, "adapter name")
    skip = [gr.skip()] * (MAX_SLOTS + 3)
    state = {}

    def prepare():
        state["npz"], state["preview"] = write_style_data(_uploads(files, drawn), page.styles_dir, name)
        return state["npz"]

    job = page.runner.start(name, steps, prepare, session=session)
    yield f"fine-tune started: `{shown_command(job.cmd)}`", state["preview"], gr.skip(), gr.skip(), *skip
    while job.running():
        time.sleep(1.0)
        p = job.progress()
        yield gr.skip(), gr.skip(), p.html(), p.previews[-1] if p.previews else gr.skip(), *skip
    job.thread.join(5)
    p = job.progress()
    if p.ok:
        msg = f"done: adapter `{os.path.relpath(job.out, page.studio.out_dir)}` is in the list above"
    else:
        msg = f"the fine-tune stopped (exit code {p.returncode}): " + " / ".join(p.tail)
    yield gr.skip(), gr.skip(), p.html() + "\n\n" + msg, p.previews[-1] if p.previews else gr.skip(), \
        *do_refresh(page)


def do_stop(page):
    return "fine-tune stopped" if page.runner.stop() else "no fine-tune is running"


# ------------------------------------------------------------------ the page's layout

def handler(fn, page, session=False):
    """``fn`` bound to ``page`` as Gradio calls it: a refusal (any UserError) is one line on the page, never a
    traceback. With ``session``, Gradio passes the request last (it finds it by the signature) and the tab's
    session id goes on to ``fn`` (the fine-tune it starts stops when that tab goes away)."""
    import inspect

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
                raise gr.Error(one_line(e), print_exception=False) from None
    else:
        def call(*args):
            a, kw = bound(args)
            try:
                return fn(*a, **kw)
            except UserError as e:
                raise gr.Error(one_line(e), print_exception=False) from None
    call.__name__ = fn.__name__
    if session:
        params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("page", "session")]
        request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
        call.__signature__ = inspect.Signature([*params, request])
        call.__annotations__ = {"request": gr.Request}
    return call


def sample_room(page, ui):
    """Labels, samples per label, seed, sampler, steps, guidance; Sample and Save; the grid."""
    import gradio as gr

    studio, defaults = page.studio, preset_config(SampleConfig, page.studio.preset)
    digits = [str(i) for i in range(studio.num_classes)]
    with gr.Row():
        with gr.Column(scale=1):
            ui.labels = gr.CheckboxGroup(digits, value=digits, label="labels", elem_id="labels")
            ui.n_per_label = gr.Slider(1, MAX_PER_LABEL, value=1, step=1, label="samples per label",
                                       elem_id="n_per_label")
            ui.seed = gr.Number(studio.seed, precision=None, label="seed", elem_id="seed")
            samplers = next(f for f in dataclasses.fields(SampleConfig) if f.name == "sampler").metadata["choices"]
            ui.sampler = gr.Radio(list(samplers), value=defaults.sampler, label="sampler",
                                  info="ddpm always runs all T steps")
            ui.steps = gr.Slider(1, studio.timesteps, value=min(defaults.steps, studio.timesteps), step=1,
                                 label="steps (all but ddpm)", elem_id="steps")
            ui.guidance = gr.Slider(0, 20, value=defaults.guidance, step=0.1, label="guidance", elem_id="guidance")
            ui.sample_btn = gr.Button("Sample", variant="primary", elem_id="sample")
            with gr.Row():
                ui.save_name = gr.Textbox("app_samples", label=f"save as (under {studio.out_dir}/{APP_DIR}/)",
                                          elem_id="save_name")
                ui.save_btn = gr.Button("Save grid + .npz", elem_id="save")
        with gr.Column(scale=2):
            ui.image = gr.Image(label="samples (a column per label)", format="png", type="numpy", interactive=False,
                                elem_id="grid", buttons=["download"])
            ui.status = gr.Markdown(elem_id="status")


def adapter_room(page, ui):
    """A weight slider per adapter, the sweep and the comparison, Look for new adapters, Add a folder."""
    import gradio as gr

    gr.Markdown("### Adapters")
    with gr.Row():
        with gr.Column(scale=1):
            ui.slots = [gr.Slider(*SLIDER_SPAN, value=0.0, step=0.05, visible=False, elem_id=f"weight_{i}")
                        for i in range(MAX_SLOTS)]
            ui.note = gr.Markdown(adapter_note(page.studio))
            ui.sweep_pick = gr.Dropdown(choices=[], value=None, label="adapter to sweep")
            with gr.Row():
                ui.sweep_btn = gr.Button("Weight sweep", elem_id="sweep")
                ui.compare_btn = gr.Button("Base vs adapters", elem_id="compare")
                ui.refresh_btn = gr.Button("Look for new adapters")
            with gr.Row():
                ui.add_path = gr.Textbox(label="or add an adapter folder (inside the page's folders)",
                                         elem_id="add_path")
                ui.add_path_btn = gr.Button("Add", elem_id="add_adapter")
        with gr.Column(scale=2):
            ui.extra = gr.Image(label="sweep / comparison", format="png", type="numpy", interactive=False,
                                elem_id="extra")


def style_room(page, ui):
    """Uploads and drawings, the adapter's name and steps; Check data, Fine-tune, Stop; the progress."""
    import gradio as gr

    gr.Markdown("### Your style: fine-tune an adapter on your own digits")
    with gr.Row():
        with gr.Column(scale=1):
            ui.files = gr.File(file_count="multiple", label="images or a zip, labelled 7/a.png or 7_a.png",
                               file_types=[*IMAGE_EXTS, ".zip"], type="filepath", elem_id="uploads")
            with gr.Row():
                ui.sketch = gr.Sketchpad(label="or draw a digit", type="numpy", canvas_size=(280, 280),
                                         elem_id="sketch")
                with gr.Column():
                    ui.sketch_label = gr.Dropdown([str(i) for i in range(10)], value="0", label="its label")
                    ui.add_btn = gr.Button("Add drawing")
                    ui.clear_btn = gr.Button("Clear drawings")
            ui.style_name = gr.Textbox("my_style", label="adapter name", elem_id="style_name")
            ui.ft_steps = gr.Number(preset_config(LoraConfig, page.studio.preset).lora_steps, precision=None,
                                    label="fine-tune steps", elem_id="ft_steps")
            with gr.Row():
                ui.check_btn = gr.Button("Check data", elem_id="check")
                ui.train_btn = gr.Button("Fine-tune", variant="primary", elem_id="train")
                ui.stop_btn = gr.Button("Stop", elem_id="stop")
        with gr.Column(scale=2):
            ui.style_msg = gr.Markdown(elem_id="style_msg")
            ui.data_preview = gr.Image(label="what the model will train on", format="png", type="filepath",
                                       interactive=False, elem_id="data_preview")
            ui.ft_progress = gr.Markdown(elem_id="ft_progress")
            ui.ft_preview = gr.Image(label="fine-tune previews", format="png", type="filepath", interactive=False)


def wire(page, ui, demo):
    """Each button to its handler. ``preprocess=False`` where the inputs are plain values: the handler checks
    them as sent (Gradio would round a seed of 1.5 to 2 first); files and the sketch keep Gradio's reading."""
    import gradio as gr

    def on(event, fn, inputs, outputs, raw=True, session=False, model=False):
        event(handler(fn, page, session), inputs, outputs, api_name=fn.__name__, preprocess=not raw,
              **({"concurrency_id": "model"} if model else {}))

    form = [ui.labels, ui.n_per_label, ui.seed, ui.sampler, ui.steps, ui.guidance, *ui.slots]
    shown_grid = [ui.image, ui.grid, ui.status]
    on(ui.sample_btn.click, do_sample, [ui.names, *form], shown_grid, model=True)
    for slot in ui.slots:  # a slider's release redraws with the new weight
        slot.release(handler(do_sample, page), [ui.names, *form], shown_grid, concurrency_id="model",
                     preprocess=False, api_visibility="undocumented")
    on(ui.save_btn.click, do_save, [ui.grid, ui.save_name], ui.status)
    on(ui.sweep_btn.click, do_sweep, [ui.names, ui.sweep_pick, *form], ui.extra, model=True)
    on(ui.compare_btn.click, do_compare, [ui.names, *form], ui.extra, model=True)
    listed = [*ui.slots, ui.note, ui.sweep_pick, ui.names]
    on(ui.refresh_btn.click, do_refresh, None, listed)
    on(ui.add_path_btn.click, do_add_path, [ui.add_path], listed)
    demo.load(handler(do_refresh, page), None, listed)
    on(ui.add_btn.click, do_add_drawing, [ui.sketch, ui.sketch_label, ui.drawn], [ui.drawn, ui.style_msg, ui.sketch],
       raw=False)
    on(ui.clear_btn.click, do_clear, None, [ui.drawn, ui.style_msg])
    on(ui.check_btn.click, do_check, [ui.files, ui.drawn, ui.style_name], [ui.style_msg, ui.data_preview])
    on(ui.train_btn.click, do_train, [ui.files, ui.drawn, ui.style_name, ui.ft_steps],
       [ui.style_msg, ui.data_preview, ui.ft_progress, ui.ft_preview, *listed], session=True)
    on(ui.stop_btn.click, do_stop, None, ui.ft_progress)

    def on_unload(request: gr.Request):  # the page that started a fine-tune went away: its run stops with it
        page.runner.stop(session=getattr(request, "session_hash", None) or "")

    demo.unload(on_unload)


def build(page):
    """The page: the three rooms' widgets, the tab's own state, and the wiring."""
    import types

    import gradio as gr

    studio, ui = page.studio, types.SimpleNamespace()
    with gr.Blocks(title="MNIST diffusion + LoRA", analytics_enabled=False) as demo:
        ui.grid = gr.State(None)  # this tab's last grid (Save writes it)
        ui.drawn = gr.State([])  # this tab's drawings: (label, image)
        ui.names = gr.State([])  # the adapter each of this tab's sliders shows
        gr.Markdown(f"## Digits from `{os.path.relpath(studio.ckpt)}` ({studio.weights} weights, "
                    f"{studio.device.type}, {studio.precision})")
        sample_room(page, ui)
        adapter_room(page, ui)
        style_room(page, ui)
        wire(page, ui, demo)
    return demo


# ------------------------------------------------------------------ command line

def offline_env(out_dir):
    """Settings that keep Gradio from reaching the internet and writing outside --out-dir; before importing it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["GRADIO_SSR_MODE"] = "False"
    os.environ["GRADIO_MCP_SERVER"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(os.path.realpath(out_dir), APP_DIR, ".uploads")


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    model, out, page = p.group("model"), p.group("output"), p.group("page")
    model.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg, help="base checkpoint from train.py")
    model.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (better) or raw weights")
    model.add_argument("--lora-dir", action="append", default=None, type=path_arg, metavar="FOLDER",
                       help="also list the adapters in FOLDER (read only); repeat for several")
    out.add_argument("--out-dir", default=DEFAULT_OUT_DIR, type=path_arg,
                     help="adapters are listed from here; saved grids, style data and fine-tunes go under OUT_DIR/app/")
    page.add_argument("--host", default="127.0.0.1",
                      help="address to listen on; 0.0.0.0 opens the page to every machine that can reach this one")
    page.add_argument("--port", type=bounded(int, ge=1, le=65535), default=DEFAULT_PORT, help="port to listen on")
    page.add_argument("--share", action="store_true",
                      help="also ask gradio.live for a public link (off: nothing leaves this machine)")
    page.add_argument("--bench", action="store_true",
                      help="time the page's first grid of 10 digits and a weight-slider redraw, print them as JSON "
                           "and exit, serving nothing (the figures the README gives)")
    add_preset_arg(p)  # the page's sampler defaults and the fine-tune's settings
    add_runtime_args(p)  # --seed: the page's first seed
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None):
    return run_main(serve, parse_args(argv))


def serve(args, block=True):
    rcfg = runtime_from_args(args)
    device = pick_device(rcfg.device)
    precision = resolve_precision(rcfg.precision, device)  # sampling: the rule, never timed (as denoise.py)
    studio = Studio(args.ckpt, args.out_dir, args.lora_dir or [], device=device, precision=precision,
                    weights=args.weights, preset=args.preset, seed=rcfg.seed)
    if args.bench:
        print(json.dumps({"device": str(device), "precision": precision, **bench_entry(studio)}))
        return None
    # the fine-tune as asked (on CUDA, auto times its step), on the page's device, from seed 0 as the CLI's default
    runtime = dataclasses.replace(rcfg, device=device.type, seed=0)
    page = Page(studio, Runner(studio.ckpt, args.weights, args.preset, runtime,
                               os.path.join(studio.out_dir, APP_DIR, "adapters")))
    offline_env(args.out_dir)
    try:
        import gradio  # noqa: F401 -- only here, so the rooms work without it
    except ImportError:
        raise PageError("the page needs Gradio: pip install -r requirements-app.txt") from None
    print(f"app: {args.ckpt} [{args.weights}] on {device} ({precision}), {len(studio.usable())} adapter(s): "
          + (", ".join(e.name for e in studio.usable()) or "none"))
    demo = build(page)
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD_BYTES,
            prevent_thread_lock=not block, ssr_mode=False, show_error=False, quiet=not block, footer_links=[],
            allowed_paths=[os.path.join(studio.out_dir, APP_DIR)])
    except OSError as e:
        raise PageError(f"cannot listen on {args.host}:{args.port} ({e}); pass another --port") from None
    if not block:
        return demo, page
    page.runner.stop()
    return None


if __name__ == "__main__":
    main()
