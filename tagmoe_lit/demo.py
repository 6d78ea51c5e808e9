"""`python -m tagmoe_lit demo`: a local web page to edit images with a checkpoint and watch the routing.

    python -m tagmoe_lit demo --config experiments/base.yaml --ckpt_path runs/base/…/last.ckpt

Upload an image, type an instruction, press Edit: the page shows the edit beside one bar chart per
MoE layer (the routing signature g over the experts) and the tags the router reads the task as.
It edits exactly as `edit` does (`edit_cli.Editor`, the same options). Safe by default, because a
demo is easy to leave running: it binds 127.0.0.1 (`--host` to change it, knowingly), never makes a
share link, accepts only PNG, JPEG and WebP uploads up to `--max_upload_mb` and `--max_pixels`,
runs one edit at a time with a queue of one (a second request waits, a third is turned away),
keeps uploads and results in a temporary folder that is removed on exit (and swept every 10
minutes while it runs), sends no analytics, and serves every font and script itself (a system font
stack: no web fonts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

from tagmoe_lit.edit_cli import Editor, add_model_arguments, load_editor
from tagmoe_lit.editing import MAX_PIXELS, EditInputError, open_image, to_pil

# small models edit small images: show their pixels enlarged and sharp, not blurred
CSS = "#source img, #edited img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tagmoe_lit demo", description=__doc__.splitlines()[0].split(": ", 1)[1])
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--max_upload_mb", type=float, default=10.0, help="largest upload in MB (default: 10)")
    p.add_argument("--max_pixels", type=int, default=16 * 2**20, help="largest image in pixels (default: 16 Mpx)")
    return p


def routing_chart(record: dict[str, Any]):
    """One row of bars per MoE layer: the routing signature g over the experts (a PIL image)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    layers = record["routing_signature"] or {}
    fig, axes = plt.subplots(max(len(layers), 1), 1, figsize=(4.5, 0.9 + 1.1 * max(len(layers), 1)), squeeze=False)
    for ax, (name, g) in zip(axes[:, 0], layers.items()):
        ax.bar([f"e{e}" for e in range(len(g))], g, color="#4c72b0")
        ax.set_ylim(0, 1)
        ax.set_ylabel(name.replace("_", " "), fontsize=8)
        ax.tick_params(labelsize=8)
    if not layers:
        axes[0, 0].text(0.5, 0.5, "dense model: no routing", ha="center", va="center")
        axes[0, 0].axis("off")
    fig.suptitle("routing signature g per MoE layer", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return Image.open(io.BytesIO(buffer.getvalue()))


class MissingExtraError(LookupError):
    """The demo's optional dependency is not installed."""


def build_app(editor: Editor, max_pixels: int = MAX_PIXELS):
    """The Gradio Blocks of the page (not launched)."""
    try:
        import gradio as gr
    except ImportError:
        raise MissingExtraError("The demo needs Gradio, which is not installed; run pip install 'tagmoe_lit[demo]'.") from None

    def run(path: str | None, instruction: str, seed: float, steps: float):
        if not path:
            raise gr.Error("Upload an image first.")
        try:  # the upload stays for another edit of it (new seed, new instruction) until the cache sweep
            image = open_image(path, max_pixels)
            result, record = editor(image, instruction, int(seed), int(steps))
        except EditInputError as err:
            raise gr.Error(str(err)) from None
        tags = ", ".join(record["predicted_tags"]) if record["predicted_tags"] else "(no alignment head)"
        return to_pil(result.image), routing_chart(record), f"**The router reads the task as:** {tags}  \n{record['seconds']} s"

    steps = editor.sampler.steps
    with gr.Blocks(analytics_enabled=False, title="TAG-MoE edit", delete_cache=(600, 600)) as app:
        gr.Markdown("## TAG-MoE: edit an image\nThe routing bars show which experts each MoE layer used; no task tags are given.")
        with gr.Row():
            with gr.Column():
                source = gr.Image(type="filepath", label="image (PNG, JPEG, WebP)", sources=["upload"], elem_id="source",
                                  height=320)
                instruction = gr.Textbox(label="instruction", placeholder="make the sky pink", elem_id="instruction")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    step_count = gr.Slider(1, max(100, steps), value=steps, step=1, label="steps", elem_id="steps")
                button = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Column():
                edited = gr.Image(label="edit", interactive=False, elem_id="edited", format="png", height=320)
                routing = gr.Image(label="routing", interactive=False, elem_id="routing", format="png")
                tags = gr.Markdown(elem_id="tags")
        button.click(run, [source, instruction, seed, step_count], [edited, routing, tags], concurrency_limit=1)
    return app


def theme():
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def launch(app, host: str, port: int, max_upload_mb: float, block: bool = True):
    """Serve `app` with the safe settings (see the module docstring); returns Gradio's launch result."""
    app.queue(max_size=1, default_concurrency_limit=1)
    return app.launch(
        server_name=host, server_port=port, share=False, max_file_size=int(max_upload_mb * 2**20), footer_links=[],
        ssr_mode=False, theme=theme(), css=CSS, quiet=True, prevent_thread_lock=not block, inbrowser=False, show_error=True,
    )


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM end the demo through its cleanup, even when the process started with SIGINT
    ignored (a background job of a non-interactive shell inherits that, and Python then raises no
    KeyboardInterrupt)."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> None:
    args, rest = parser().parse_known_args(argv)
    _stop_on_signals()
    cache = tempfile.mkdtemp(prefix="tagmoe_demo_")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = cache  # uploads and results live here, and go with it
    try:
        editor = load_editor(args, rest)
        app = build_app(editor, args.max_pixels)
        print(f"TAG-MoE demo on http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops it; files in {cache} are removed then)")
        launch(app, args.host, args.port, args.max_upload_mb)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
