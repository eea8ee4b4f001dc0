"""The Gradio page of the web chat (:class:`WebUI`) and the FastAPI app that serves it (:func:`create_app`).

Layout: a header with the model picker; a banner when the controller cannot be reached (or has no worker), with
Retry; the image panel (one card: the image as the model will see it, a drop zone that takes a new file at any
time, DICOM tags, window presets and a slice slider) beside the conversation, which is the main, tall, resizable
area (on narrow screens it comes first); the question box with a character counter near the limit; Regenerate,
Clear, votes and the conversation's export (Markdown and JSON); examples as thumbnails with their question.

Each answer goes through :class:`llava_med.serve.client.LlavaMedClient` (handlers in
:mod:`llava_med.serve.web.handlers`). **Stop** cancels the Gradio event; the generator then closes its HTTP stream
and the worker cancels the request at once. State lives in per-browser-session ``gr.State`` values (the
:class:`ChatSession` and the panel's image) and in the :class:`WebUI` object.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from llava_med.constants import DEFAULT_CONTROLLER_URL, DEFAULT_HOST, DEFAULT_WEB_PORT, RESEARCH_ONLY_NOTICE
from llava_med.errors import MissingDependencyError
from llava_med.sampling import CHAT_DEFAULTS
from llava_med.serve.web.assets import CSS, head_script
from llava_med.serve.web.chat_log import ConversationLog
from llava_med.serve.web.config import (
    COUNTER_FROM,
    DEFAULT_CONCURRENCY_COUNT,
    DEFAULT_IMAGE_PROCESS_MODE,
    DEFAULT_LOG_DIR,
    IMAGE_PROCESS_MODES,
    SUPPORTED_IMAGES_TEXT,
    UPLOAD_FILE_TYPES,
    WebConfig,
)
from llava_med.serve.web.examples import Example, prepare_examples
from llava_med.serve.web.handlers import Components, Handlers
from llava_med.serve.web.messages import controller_banner

try:  # the web UI is an optional extra: pip install 'llava-med-serve[web]'
    import gradio as gr
except ImportError:  # pragma: no cover - exercised only without the extra
    gr = None  # type: ignore[assignment]

__all__ = ["WebUI", "build_demo", "create_app", "require_gradio"]

logger = logging.getLogger(__name__)

#: Seconds an image panel's state (the uploaded bytes) is kept after its last change.
PANEL_TTL = 4 * 3600
PLACEHOLDER = ("### Ask LLaVA-Med about a biomedical image\nDrop or paste an image in the panel (PNG, JPEG, TIFF, "
               "DICOM, or a DICOM series as several files or a .zip), or pick an example below, then ask.")


def require_gradio() -> Any:
    if gr is None:
        raise MissingDependencyError(
            "the web UI needs gradio 6: pip install 'gradio>=6,<7' (or pip install -e '.[web]')"
        )
    return gr


class WebUI(Handlers):
    """The Gradio app: its handlers talk to the controller and workers through ``LlavaMedClient``."""

    def __init__(self, config: WebConfig) -> None:
        require_gradio()
        self.config = config
        self.log = ConversationLog(config.log_dir)
        self.exports_dir = Path(tempfile.mkdtemp(prefix="llava-med-exports-"))
        self.examples: list[Example] = []
        if config.examples:
            try:
                self.examples = prepare_examples(config.examples_dir)
            except OSError as exc:
                logger.warning("cannot write the example images to %s: %s", config.examples_dir, exc)
        self.initial_models, self.initial_reachable = self.controller_state()
        self.c = Components()
        self.demo = self._build()

    def page_load(self, current: str | None) -> dict[Any, Any]:
        """A page opens: with ``--model-list-mode reload`` (or no model yet) ask the controller again."""
        if self.config.model_list_mode == "reload" or not self.initial_models:
            return self.refresh_models(current)
        return self._banner(self.initial_models, self.initial_reachable)

    # ---------------------------------------------------------------------------------------- layout
    def _build(self) -> Any:
        cfg, c = self.config, self.c
        models = self.initial_models
        banner_text = "" if models else controller_banner(cfg.controller_url, reachable=self.initial_reachable)
        with gr.Blocks(title="LLaVA-Med", analytics_enabled=False, fill_height=False) as demo:
            c.state = gr.State(None)
            # The panel holds the uploaded bytes (a series may be hundreds of MB): kept for a few idle hours at
            # most; Gradio also drops it when the tab closes.
            c.panel = gr.State(None, time_to_live=PANEL_TTL)
            with gr.Row(elem_id="llava-med-header", equal_height=True):
                with gr.Column(scale=3, min_width=240):
                    if not cfg.embed:
                        gr.Markdown("# LLaVA-Med\nA large language-and-vision assistant for biomedicine",
                                    elem_id="llava-med-title")
                with gr.Row(elem_id="llava-med-model-row", scale=2):
                    gr.Markdown("Model", elem_id="llava-med-model-label")
                    c.model = gr.Dropdown(choices=models, value=models[0] if models else None, label="Model",
                                          show_label=False, container=False, interactive=True,
                                          allow_custom_value=True, scale=8, elem_id="llava-med-model")
                    c.refresh = gr.Button("↻", scale=1, min_width=44, elem_id="llava-med-refresh", size="sm")
            gr.Markdown(f"**Research use only.** {RESEARCH_ONLY_NOTICE}", elem_id="llava-med-notice")
            with gr.Row(elem_id="llava-med-banner", visible=bool(banner_text), equal_height=True) as c.banner:
                c.banner_text = gr.Markdown(banner_text, label="Banner", elem_id="llava-med-banner-text")
                c.retry = gr.Button("Retry", variant="primary", size="sm", scale=0, min_width=90,
                                    elem_id="llava-med-banner-retry")
            with gr.Row(elem_id="llava-med-main", equal_height=False):
                with gr.Column(scale=4, min_width=300, elem_id="llava-med-side"):
                    with gr.Column(elem_id="llava-med-image-panel"):
                        c.preview = gr.Image(label="Image as the model sees it", show_label=False, type="pil",
                                             format="png", interactive=False, height=320, visible=False,
                                             elem_id="llava-med-preview", buttons=["fullscreen"])
                        c.upload = gr.File(label="Upload", show_label=False, file_count="multiple",
                                           file_types=UPLOAD_FILE_TYPES, type="filepath", height=150,
                                           elem_id="llava-med-upload")
                        c.upload_status = gr.HTML("", label="Upload status", elem_id="llava-med-upload-status")
                        c.dicom_info = gr.HTML("", label="DICOM tags", elem_id="llava-med-dicom-info", visible=False)
                        c.window = gr.Radio([], label="Window", visible=False, elem_id="llava-med-window",
                                            info="Changes the image the model sees")
                        c.slice = gr.Slider(1, 2, value=1, step=1, label="Slice", visible=False,
                                            elem_id="llava-med-slice")
                    c.image_mode = gr.Radio(list(IMAGE_PROCESS_MODES), value=DEFAULT_IMAGE_PROCESS_MODE,
                                            label="Fit a non-square image", elem_id="llava-med-image-mode",
                                            info="Default: the checkpoint's setting (Pad for LLaVA-Med v1.5)")
                    with gr.Accordion("Parameters", open=False, elem_id="llava-med-parameters"):
                        c.temperature = gr.Slider(0.0, 1.0, value=CHAT_DEFAULTS.temperature, step=0.1,
                                                  label="Temperature", elem_id="llava-med-temperature")
                        c.top_p = gr.Slider(0.05, 1.0, value=CHAT_DEFAULTS.top_p, step=0.05, label="Top P",
                                            elem_id="llava-med-top-p")
                        c.max_tokens = gr.Slider(8, 1024, value=CHAT_DEFAULTS.max_new_tokens, step=8,
                                                 label="Max output tokens", elem_id="llava-med-max-tokens")
                with gr.Column(scale=7, min_width=300, elem_id="llava-med-chat-column"):
                    c.chatbot = gr.Chatbot(label="Conversation", show_label=False, elem_id="llava-med-chat",
                                           height="68vh", min_height=380, resizable=True, placeholder=PLACEHOLDER,
                                           buttons=["copy", "copy_all"], feedback_options=None, layout="bubble",
                                           allow_tags=False, sanitize_html=True, allow_file_downloads=False)
                    with gr.Row(equal_height=True):
                        c.textbox = gr.Textbox(label="Question", show_label=False, placeholder="Ask about the image…",
                                               scale=8, container=False, lines=2, max_lines=8,
                                               elem_id="llava-med-input", autofocus=True)
                        c.send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="llava-med-send")
                        c.stop = gr.Button("■ Stop", variant="stop", scale=1, min_width=90, visible=False,
                                           elem_id="llava-med-stop")
                    # The question box's character counter (written by the page's script, assets.py).
                    gr.HTML('<div id="llava-med-counter" aria-live="polite"></div>', elem_id="llava-med-counter-box",
                            padding=False)
                    with gr.Row(elem_id="llava-med-actions"):
                        small = {"size": "sm", "min_width": 0, "scale": 0}
                        c.regenerate = gr.Button("↻ Regenerate", interactive=False, elem_id="llava-med-regenerate",
                                                 **small)
                        c.clear = gr.Button("✕ Clear", elem_id="llava-med-clear", **small)
                        c.upvote = gr.Button("▲ Upvote", interactive=False, elem_id="llava-med-upvote", **small)
                        c.downvote = gr.Button("▼ Downvote", interactive=False, elem_id="llava-med-downvote",
                                               **small)
                        c.flag = gr.Button("⚑ Flag", interactive=False, elem_id="llava-med-flag", **small)
                        c.export_md = gr.DownloadButton("⬇ Markdown", interactive=False, elem_id="llava-med-export-md",
                                                        **small)
                        c.export_json = gr.DownloadButton("⬇ JSON", interactive=False,
                                                          elem_id="llava-med-export-json", **small)
                    c.feedback = gr.Markdown("", label="Notice", elem_id="llava-med-feedback")
            example_buttons = []
            if self.examples:
                gr.Markdown("#### Examples\nReal samples from installed packages, or images drawn by code. Click one "
                            "to load its image and question.", elem_id="llava-med-examples-title")
                with gr.Row(elem_id="llava-med-examples"):
                    for i, example in enumerate(self.examples):
                        example_buttons.append(gr.Button(example.question, icon=example.thumbnail,
                                                         elem_classes=["llava-med-example"],
                                                         elem_id=f"llava-med-example-{i}"))
            gr.Markdown("Answers are generated by a model and may be wrong. Images sent to the model and the chats "
                        "are logged on the server for research (never DICOM patient data). Uploads: "
                        f"{SUPPORTED_IMAGES_TEXT}.", elem_classes=["llava-med-footer"])
            self._wire(demo, example_buttons)
        demo.queue(default_concurrency_limit=cfg.concurrency_count)
        return demo

    def _wire(self, demo: Any, example_buttons: list[Any]) -> None:
        cfg, c = self.config, self.c
        chat_outputs, panel_outputs = c.chat_outputs(), c.panel_outputs()
        params = [c.model, c.temperature, c.top_p, c.max_tokens]
        generate = {"concurrency_limit": cfg.concurrency_count, "concurrency_id": "generate",
                    "show_progress": "hidden"}
        chat_event = gr.on(triggers=[c.textbox.submit, c.send.click], fn=self.chat,
                           inputs=[c.state, c.panel, c.textbox, c.image_mode, *params], outputs=chat_outputs,
                           api_name="chat", **generate)
        regen_event = c.regenerate.click(self.regenerate, inputs=[c.state, c.image_mode, *params],
                                         outputs=chat_outputs, api_name="regenerate", **generate)
        c.stop.click(self.stop, inputs=[c.state], outputs=chat_outputs, cancels=[chat_event, regen_event],
                     api_name="stop", queue=False, show_progress="hidden")
        # Clear (and the chat's own trash icon) also cancels a running answer, as Stop does.
        for trigger, visibility in ((c.clear.click, "public"), (c.chatbot.clear, "private")):
            trigger(self.clear, inputs=None, outputs=[*chat_outputs, *panel_outputs], cancels=[chat_event, regen_event],
                    api_name="clear" if visibility == "public" else None, api_visibility=visibility, queue=False,
                    show_progress="hidden")
        for button, handler, name in ((c.upvote, self.upvote, "upvote"), (c.downvote, self.downvote, "downvote"),
                                      (c.flag, self.flag, "flag")):
            button.click(handler, inputs=[c.state, c.model], outputs=chat_outputs, api_name=name, queue=False,
                         show_progress="hidden")
        c.upload.upload(self.upload, inputs=[c.upload], outputs=panel_outputs, api_name="upload",
                        show_progress="minimal")
        c.window.input(self.choose_window, inputs=[c.window, c.panel], outputs=panel_outputs, api_name="window",
                       show_progress="hidden", trigger_mode="always_last")
        c.slice.input(self.choose_slice, inputs=[c.slice, c.panel], outputs=panel_outputs, api_name="slice",
                      show_progress="hidden", trigger_mode="always_last")
        for i, button in enumerate(example_buttons):
            button.click(functools.partial(self.load_example, i), inputs=None,
                         outputs=[*panel_outputs, c.textbox], api_visibility="private", show_progress="hidden")
        banner_outputs = [c.model, c.banner, c.banner_text]
        for button, name in ((c.refresh, "refresh_models"), (c.retry, "retry")):
            button.click(self.refresh_models, inputs=[c.model], outputs=banner_outputs, api_name=name, queue=False)
        demo.load(self.page_load, inputs=[c.model], outputs=banner_outputs, api_visibility="private", queue=False)

    # ---------------------------------------------------------------------------------------- serving
    def mount_options(self) -> dict[str, Any]:
        """Keyword arguments shared by ``gr.mount_gradio_app`` and ``Blocks.launch``."""
        self.log.images_dir.mkdir(parents=True, exist_ok=True)
        allowed = [str(self.log.images_dir.resolve()), str(self.exports_dir.resolve())]
        if self.config.examples_dir is not None:
            allowed.append(str(Path(self.config.examples_dir).resolve()))
        return {
            "allowed_paths": allowed,
            "max_file_size": max(self.config.max_image_bytes, self.config.max_series_bytes),
            "theme": gr.themes.Soft(
                primary_hue="teal",
                font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
            ),
            "css": CSS,
            "head": head_script(self.config.max_input_chars, int(self.config.max_input_chars * COUNTER_FROM)),
            "footer_links": ["api"],
            "ssr_mode": False,
            "mcp_server": False,
        }


def build_demo(controller_url: str = DEFAULT_CONTROLLER_URL, *, model_list_mode: str = "once",
               log_dir: str | os.PathLike[str] = DEFAULT_LOG_DIR, concurrency_count: int = DEFAULT_CONCURRENCY_COUNT,
               **options: Any) -> Any:
    """The Gradio ``Blocks`` of the chat (queue configured). Other options: see :class:`WebConfig`."""
    return WebUI(WebConfig(controller_url=controller_url, model_list_mode=model_list_mode, log_dir=Path(log_dir),
                           concurrency_count=concurrency_count, **options)).demo


def create_app(ui: WebUI, *, host: str = DEFAULT_HOST, port: int = DEFAULT_WEB_PORT) -> Any:
    """A FastAPI app serving the UI at ``/`` and ``GET /health`` (what the launcher waits on)."""
    from fastapi import FastAPI

    app = FastAPI(title="LLaVA-Med web UI", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web_ui = ui

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "controller_url": ui.config.controller_url}

    return gr.mount_gradio_app(app, ui.demo, path="/", server_name=host, server_port=port, **ui.mount_options())
