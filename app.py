"""A local web page to play with the model: sample digits, mix adapters, fine-tune an adapter on your own digits,
restyle a digit of your own.

    python app.py                                   # http://127.0.0.1:7860: out/ckpt.pt and every adapter under out/
    python app.py --lora-dir ~/adapters --port 7861 # also list the adapters in another folder
    python app.py --host 0.0.0.0                    # reachable from other machines (loopback only by default)

The adapters' weight sliders sit on the left, beside every tab, and belong to this browser tab alone:
    Sample        labels, samples per label, seed, sampler, steps, guidance: the grid shows the current x0 estimate
                  as it denoises, then the final grid, the same one `denoise.py` gives for the same settings and
                  seed (a column per label); "Save" writes it labelled, with its settings as PNG text, and its
                  .npz, never over a file; a PNG dropped there gives its settings back (and names any the page
                  has no widget for, which `denoise.py --from-png` redraws exactly)
    Adapters      a weight sweep of one adapter (its columns as they finish), the base against the adapters on
                  the same noise, and adapters added from a folder
    Your style    images or a zip labelled by folder or file name (7/a.png, 7_a.png: as `--data` reads them), or
                  digits drawn on the page; runs `lora_finetune.py --data` in the background (one at a time) with
                  its steps, loss and time left, ends on the base against the new adapter; Stop saves, Resume goes on
    From a digit  draw or upload a digit, pick a label and a strength: it is noised that far and denoised
                  through the adapters (SDEdit), the result beside the input

This file is the command line and the page's layout; what the buttons call is handlers.py, over studio.py (the
model and its adapters), uploads.py (your digits) and jobs.py (the fine-tune), with no Gradio in those. A
refusal is one line in the panel it concerns, kept there until that panel's next action, and a pop-up. The
page reads and writes only under --out-dir and the --lora-dir folders.
"""

import dataclasses
import json
import os

from cli import ArgumentParser, add_preset_arg, add_runtime_args, bounded, path_arg, runtime_from_args
from config import DEFAULT_CKPT, DEFAULT_OUT_DIR, LoraConfig, SampleConfig, preset_config
from errors import run_main
from handlers import (MAX_SLOTS, Page, adapter_note, do_add_drawing, do_add_path, do_check, do_clear,  # noqa: F401
                      do_compare, do_fast, do_img2img, do_png_info, do_refresh, do_resume, do_sample, do_save, do_stop,
                      do_slider_img2img, do_slider_sample, do_sweep, do_train, handler, one_line,
                      ERROR_MARK)
from jobs import Runner
from runtime import pick_device, resolve_precision
from studio import APP_DIR, FAST_STEPS, MAX_PER_LABEL, PageError, Studio, bench_entry
from uploads import IMAGE_EXTS, MAX_UPLOAD_BYTES

DEFAULT_PORT = 7860
# The sliders show -1..2, where an adapter's effect reads well (below 0 its style is reversed, past 2 the digits
# break up); what a request may send is the one range an adapter's weight has everywhere, config.WEIGHT_RANGE.
SLIDER_SPAN = (-1.0, 2.0)
# Fits 1366x768: the sliders' column, then each tab's controls beside its picture; the pictures are drawn
# PAGE_SCALE x with their labels inside, so no badge is shown over them
# the sketchpad's own "Clear canvas" button, pressed once a drawing is taken and only if it was: the canvas stays
# the sketchpad's, ready for the next strokes (a value sent back from the server replaced it with none)
CLEAR_SKETCH = ("() => { const m = document.querySelector('#style_msg'); if (m && !m.innerText.includes('Refused')) "
                "document.querySelector('#%s button[aria-label=\"Clear canvas\"]')?.click() }")
CSS = "#grid, #extra, #ft_result, #i2i_out {min-height: 300px} .gradio-container {max-width: 1366px !important}"


def picture(elem_id, **kw):
    import gradio as gr

    return gr.Image(show_label=False, format="png", interactive=False, elem_id=elem_id, buttons=["download"], **kw)


def weights_column(page, ui):
    """The adapters' sliders, this tab's own, beside every tab."""
    import gradio as gr

    gr.Markdown("**Adapters** (weights in this browser tab only)")
    ui.slots = [gr.Slider(*SLIDER_SPAN, value=0.0, step=0.05, visible=False, elem_id=f"weight_{i}")
                for i in range(MAX_SLOTS)]
    ui.note = gr.Markdown(adapter_note(page.studio))
    ui.refresh_btn = gr.Button("Look for new adapters", size="sm")


def sample_tab(page, ui):
    """Labels, samples per label, seed, sampler, steps, guidance; Sample and Save; a PNG's settings; the grid."""
    import gradio as gr

    studio, defaults = page.studio, preset_config(SampleConfig, page.studio.preset)
    digits = [str(i) for i in range(studio.num_classes)]
    samplers = next(f for f in dataclasses.fields(SampleConfig) if f.name == "sampler").metadata["choices"]
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            ui.labels = gr.CheckboxGroup(digits, value=digits, label="labels", elem_id="labels")
            with gr.Row():
                ui.n_per_label = gr.Slider(1, MAX_PER_LABEL, value=1, step=1, label="samples per label",
                                           elem_id="n_per_label")
                ui.seed = gr.Number(studio.seed, precision=None, label="seed", elem_id="seed", min_width=90)
            with gr.Row():
                ui.sampler = gr.Dropdown(list(samplers), value=defaults.sampler,
                                         label="sampler (ddpm runs all T steps)", elem_id="sampler")
                ui.fast = gr.Checkbox(False, label=f"fast: the speed adapter, lcm {FAST_STEPS} steps", elem_id="fast",
                                      min_width=120)
            with gr.Row():
                ui.steps = gr.Slider(1, studio.timesteps, value=min(defaults.steps, studio.timesteps), step=1,
                                     label="steps", elem_id="steps")
                ui.guidance = gr.Slider(0, 20, value=defaults.guidance, step=0.1, label="guidance",
                                        elem_id="guidance")
            ui.sample_btn = gr.Button("Sample", variant="primary", elem_id="sample")
            with gr.Row():
                ui.save_name = gr.Textbox("app_samples", label=f"save as {APP_DIR}/NAME.png", elem_id="save_name",
                                          min_width=120)
                ui.save_btn = gr.Button("Save", elem_id="save", min_width=60)
        with gr.Column(scale=3):
            ui.status = gr.Markdown(elem_id="status")
            ui.image = picture("grid", type="numpy")
            ui.png_in = gr.File(label="drop a PNG the page or denoise.py saved: its settings back", file_types=[".png"],
                                type="filepath", elem_id="png_in", height=60)


def adapters_tab(page, ui):
    """The sweep of one adapter and the base against the adapters; Add a folder."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            ui.sweep_pick = gr.Dropdown(choices=[], value=None, label="adapter to sweep")
            with gr.Row():
                ui.sweep_btn = gr.Button("Weight sweep", elem_id="sweep")
                ui.compare_btn = gr.Button("Base vs adapters", elem_id="compare")
            ui.add_path = gr.Textbox(label="add an adapter folder (inside the page's folders)", elem_id="add_path")
            ui.add_path_btn = gr.Button("Add", elem_id="add_adapter")
            gr.Markdown("The sweep and the comparison use the *Sample* tab's labels, seed and sampler.")
        with gr.Column(scale=3):
            ui.adapter_msg = gr.Markdown(elem_id="adapter_msg")
            ui.extra = picture("extra", type="numpy")


def style_tab(page, ui):
    """Uploads and drawings, the adapter's name and steps; Check data, Fine-tune, Stop, Resume; the progress."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            ui.files = gr.File(file_count="multiple", label="images or a zip, labelled 7/a.png or 7_a.png",
                               file_types=[*IMAGE_EXTS, ".zip"], type="filepath", elem_id="uploads", height=60)
            with gr.Row():
                ui.sketch = gr.Sketchpad(label="or draw a digit", type="numpy", canvas_size=(200, 200), height=250,
                                         elem_id="sketch", show_label=False)
                with gr.Column(min_width=90):
                    ui.sketch_label = gr.Dropdown([str(i) for i in range(10)], value="0", label="its label",
                                                  elem_id="sketch_label")
                    ui.add_btn = gr.Button("Add drawing", elem_id="add_drawing")
                    ui.clear_btn = gr.Button("Clear drawings", elem_id="clear_drawings", size="sm")
            with gr.Row():
                ui.style_name = gr.Textbox("my_style", label="adapter name", elem_id="style_name", min_width=100)
                ui.ft_steps = gr.Number(preset_config(LoraConfig, page.studio.preset).lora_steps, precision=None,
                                        label="steps", elem_id="ft_steps", min_width=70)
            with gr.Row():
                ui.check_btn = gr.Button("Check data", elem_id="check", min_width=60)
                ui.train_btn = gr.Button("Fine-tune", variant="primary", elem_id="train", min_width=60)
                ui.stop_btn = gr.Button("Stop", elem_id="stop", min_width=50)
        with gr.Column(scale=3):
            ui.style_msg = gr.Markdown(elem_id="style_msg")
            ui.ft_progress = gr.Markdown(elem_id="ft_progress")
            with gr.Row():
                ui.stopped = gr.Markdown(elem_id="stopped")
                ui.resume_pick = gr.Dropdown(choices=[], value=None, label="stopped part-way", min_width=100)
                ui.resume_btn = gr.Button("Resume", elem_id="resume", min_width=60)
            ui.ft_result = picture("ft_result", type="filepath")
            with gr.Accordion("what it trains on", open=False):
                ui.data_preview = picture("data_preview", type="filepath")
            with gr.Accordion("loss curve", open=False):
                ui.ft_curve = picture("ft_curve", type="filepath")


def digit_tab(page, ui):
    """A digit drawn or uploaded, its label and the strength; the result beside it, through the sliders' adapters."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            ui.i2i_sketch = gr.Sketchpad(type="numpy", canvas_size=(200, 200), height=250, elem_id="i2i_sketch",
                                         show_label=False)
            ui.i2i_file = gr.Image(label="or upload a digit", type="filepath", sources=["upload"], height=120,
                                   elem_id="i2i_file")
            with gr.Row():
                ui.i2i_label = gr.Dropdown([str(i) for i in range(10)], value="0", label="label", min_width=80)
                ui.strength = gr.Slider(0, 1, value=0.6, step=0.05, label="strength (0: yours, 1: new)",
                                        elem_id="strength")
            ui.i2i_btn = gr.Button("Restyle", variant="primary", elem_id="i2i")
        with gr.Column(scale=3):
            ui.i2i_msg = gr.Markdown(elem_id="i2i_msg")
            ui.i2i_out = picture("i2i_out", type="numpy")


def wire(page, ui, demo):
    """Each button to its handler, each refusal to its panel's line. ``preprocess=False`` where the inputs are
    plain values: the handler checks them as sent (Gradio would round a seed of 1.5 to 2 first); files and the
    sketches keep Gradio's reading."""
    def on(event, fn, inputs, outputs, panel=0, raw=True, session=False, model=False, **kw):
        outs = outputs if isinstance(outputs, list) else [outputs]
        return event(handler(fn, page, session, panel, len(outs)), inputs, outputs, api_name=fn.__name__,
                     preprocess=not raw, **({"concurrency_id": "model"} if model else {}), **kw)

    form = [ui.labels, ui.n_per_label, ui.seed, ui.sampler, ui.steps, ui.guidance, *ui.slots]
    shown_grid = [ui.image, ui.grid, ui.status]
    digit = [ui.names, ui.i2i_sketch, ui.i2i_file, ui.i2i_label, ui.strength, *form]
    on(ui.sample_btn.click, do_sample, [ui.names, *form], shown_grid, panel=2, model=True)
    for slot in ui.slots:  # a slider's release redraws the open tab's picture with the new weight
        on(slot.release, do_slider_sample, [ui.tab, ui.names, *form], shown_grid, panel=2, model=True,
           api_visibility="undocumented")
        on(slot.release, do_slider_img2img, [ui.tab, *digit], [ui.i2i_msg, ui.i2i_out], raw=False, model=True,
           api_visibility="undocumented")
    on(ui.fast.input, do_fast, [ui.names, ui.fast, *form], [*shown_grid, ui.sampler, ui.steps, *ui.slots], panel=2,
       model=True)
    on(ui.save_btn.click, do_save, [ui.grid, ui.save_name], ui.status)
    on(ui.png_in.upload, do_png_info, [ui.names, ui.png_in],
       [ui.status, ui.labels, ui.n_per_label, ui.seed, ui.sampler, ui.steps, ui.guidance, *ui.slots], raw=False)
    on(ui.sweep_btn.click, do_sweep, [ui.names, ui.sweep_pick, *form], [ui.adapter_msg, ui.extra], model=True)
    on(ui.compare_btn.click, do_compare, [ui.names, *form], [ui.adapter_msg, ui.extra], model=True)
    listed = [*ui.slots, ui.note, ui.sweep_pick, ui.names]
    on(ui.refresh_btn.click, do_refresh, None, listed, panel=MAX_SLOTS)
    on(ui.add_path_btn.click, do_add_path, [ui.add_path], [ui.adapter_msg, *listed])
    added = on(ui.add_btn.click, do_add_drawing, [ui.sketch, ui.sketch_label, ui.drawn], [ui.drawn, ui.style_msg],
               panel=1, raw=False)
    added.then(None, js=CLEAR_SKETCH % "sketch")
    on(ui.clear_btn.click, do_clear, None, [ui.drawn, ui.style_msg], panel=1)
    on(ui.check_btn.click, do_check, [ui.files, ui.drawn, ui.style_name], [ui.style_msg, ui.data_preview])
    followed = [ui.style_msg, ui.data_preview, ui.ft_progress, ui.ft_result, ui.ft_curve, ui.stopped,
                ui.resume_pick, *listed]
    on(ui.train_btn.click, do_train, [ui.files, ui.drawn, ui.style_name, ui.ft_steps], followed, session=True)
    on(ui.resume_btn.click, do_resume, [ui.resume_pick], followed, session=True)
    on(ui.stop_btn.click, do_stop, None, ui.style_msg)
    on(ui.i2i_btn.click, do_img2img, digit, [ui.i2i_msg, ui.i2i_out], raw=False, model=True)
    wire_page_events(page, ui, demo, listed)


def wire_page_events(page, ui, demo, listed):
    """The tab's arrival (its sliders, the stopped runs), the open tab, and its departure."""
    import gradio as gr

    from handlers import stopped_note

    demo.load(handler(do_refresh, page, panel=MAX_SLOTS, outputs=len(listed)), None, listed)
    demo.load(lambda: stopped_note(page), None, [ui.stopped, ui.resume_pick])
    for tab, key in ui.tabs:
        tab.select(lambda key=key: key, None, ui.tab, queue=False)

    def on_unload(request: gr.Request):  # the page that started a fine-tune went away: its run stops with it
        page.runner.stop(session=getattr(request, "session_hash", None) or "")

    demo.unload(on_unload)


def build(page):
    """The page: the sliders beside four tabs, the browser tab's own state, and the wiring."""
    import types

    import gradio as gr

    studio, ui = page.studio, types.SimpleNamespace()
    with gr.Blocks(title="MNIST diffusion + LoRA", analytics_enabled=False) as demo:
        ui.grid = gr.State(None)  # this tab's last grid (Save writes it)
        ui.drawn = gr.State([])  # this tab's drawings: (label, image)
        ui.names = gr.State([])  # the adapter each of this tab's sliders shows
        ui.tab = gr.State("sample")  # the tab open: a slider's release redraws its picture
        gr.Markdown(f"### Digits from `{os.path.relpath(studio.ckpt)}` ({studio.weights} weights, "
                    f"{studio.device.type}, {studio.precision})")
        with gr.Row():
            with gr.Column(scale=1, min_width=220):
                weights_column(page, ui)
            with gr.Column(scale=5):
                ui.tabs = []
                with gr.Tabs():
                    for title, key, room in (("Sample", "sample", sample_tab), ("Adapters", "adapters", adapters_tab),
                                             ("Your style", "style", style_tab), ("From a digit", "digit", digit_tab)):
                        with gr.Tab(title, id=key, elem_id=f"tab_{key}") as tab:
                            room(page, ui)
                        ui.tabs.append((tab, key))
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
            allowed_paths=[os.path.join(studio.out_dir, APP_DIR)], css=CSS)
    except OSError as e:
        raise PageError(f"cannot listen on {args.host}:{args.port} ({e}); pass another --port") from None
    if not block:
        return demo, page
    page.runner.stop()
    return None


if __name__ == "__main__":
    main()
