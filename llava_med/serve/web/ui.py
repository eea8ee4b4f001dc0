"""The Gradio page of the web chat (:class:`WebUI`) and the FastAPI app that serves it (:func:`create_app`).

Each answer goes through :class:`llava_med.serve.client.LlavaMedClient`: the controller names a worker, the worker
names its prompt template, the prompt is rendered from the chat history (:func:`llava_med.serve.web.session.
build_prompt`) and the answer is streamed from the worker. **Stop** cancels the Gradio event; the generator then
closes its HTTP stream and the worker cancels the request at once. State lives in a per-browser-session
:class:`ChatSession` (``gr.State``) and in the :class:`WebUI` object.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_med.constants import DEFAULT_CONTROLLER_URL, DEFAULT_HOST, DEFAULT_WEB_PORT, RESEARCH_ONLY_NOTICE
from llava_med.errors import ImageError, LlavaMedError, MissingDependencyError
from llava_med.images.decode import load_image
from llava_med.sampling import CHAT_DEFAULTS
from llava_med.serve.client import ClientError, LlavaMedClient, NoWorkerError
from llava_med.serve.protocol import default_auth_token
from llava_med.serve.web.chat_log import ConversationLog
from llava_med.serve.web.config import (
    CONTROL_TIMEOUT,
    DEFAULT_CONCURRENCY_COUNT,
    DEFAULT_IMAGE_PROCESS_MODE,
    DEFAULT_LOG_DIR,
    IMAGE_PROCESS_MODES,
    STOP_WAIT,
    SUPPORTED_IMAGES_TEXT,
    TURN_DONE,
    TURN_ERROR,
    TURN_STOPPED,
    TURN_STREAMING,
    UPLOAD_FILE_TYPES,
    WebConfig,
)
from llava_med.serve.web.examples import Example, prepare_examples
from llava_med.serve.web.messages import chatbot_messages, describe_error
from llava_med.serve.web.session import ChatSession, Turn, build_prompt, prepare_image

try:  # the web UI is an optional extra: pip install 'llava-med-serve[web]'
    import gradio as gr
except ImportError:  # pragma: no cover - exercised only without the extra
    gr = None  # type: ignore[assignment]

__all__ = ["WebUI", "build_demo", "create_app", "require_gradio"]

logger = logging.getLogger(__name__)


def require_gradio() -> Any:
    if gr is None:
        raise MissingDependencyError(
            "the web UI needs gradio 6: pip install 'gradio>=6,<7' (or pip install -e '.[web]')"
        )
    return gr


CSS = """
#llava-med-notice {border-left: 4px solid #d97706; padding: 6px 12px; background: rgba(217,119,6,0.08);
  border-radius: 4px; font-size: 0.9em;}
#llava-med-chat {flex-grow: 1;}
#llava-med-chat img {max-height: 220px; width: auto;}
#llava-med-preview img {object-fit: contain;}
.llava-med-footer {font-size: 0.85em; opacity: 0.8;}
"""


class WebUI:
    """The Gradio app: its handlers talk to the controller and workers through :class:`LlavaMedClient`."""

    def __init__(self, config: WebConfig) -> None:
        require_gradio()
        self.config = config
        self.log = ConversationLog(config.log_dir)
        self.examples: list[Example] = []
        if config.examples:
            try:
                self.examples = prepare_examples(config.examples_dir)
            except OSError as exc:
                logger.warning("cannot write the example images to %s: %s", config.examples_dir, exc)
        self.initial_models = self.list_models() if config.model_list_mode == "once" else self._try_models()
        self.demo = self._build()

    # ---------------------------------------------------------------------------------------- controller access
    def client(self, worker_url: str | None = None, timeout: float | None = None) -> LlavaMedClient:
        return LlavaMedClient(self.config.controller_url, worker_url=worker_url,
                              timeout=timeout or self.config.request_timeout, auth_token=default_auth_token())

    def list_models(self) -> list[str]:
        """The controller's models (after asking it to refresh its workers); [] (logged) when unreachable."""
        try:
            return self._fetch_models()
        except ClientError as exc:
            logger.warning("cannot get the model list from %s: %s", self.config.controller_url, exc)
            return []

    def _try_models(self) -> list[str]:
        try:
            return self._fetch_models()
        except ClientError:
            return []

    def _fetch_models(self) -> list[str]:
        with self.client(timeout=CONTROL_TIMEOUT) as client:
            client.refresh_all_workers()
            return client.list_models()

    # ---------------------------------------------------------------------------------------- outputs
    def _outputs(self, session: ChatSession, *, textbox: Any = None) -> tuple[Any, ...]:
        """Values for ``self._chat_outputs``: state, chatbot, textbox, then the buttons' states."""
        generating = session.generating
        idle = not generating
        has_turns = bool(session.turns)
        last = session.turns[-1] if has_turns else None
        can_vote = idle and last is not None and last.status in (TURN_DONE, TURN_STOPPED) and not session.voted
        return (
            session,
            chatbot_messages(session),
            gr.skip() if textbox is None else textbox,
            gr.update(visible=idle, interactive=idle),
            gr.update(visible=generating, interactive=generating),
            gr.update(interactive=idle and has_turns),
            gr.update(interactive=idle),
            gr.update(interactive=can_vote),
            gr.update(interactive=can_vote),
            gr.update(interactive=can_vote),
        )

    # ---------------------------------------------------------------------------------------- handlers
    def chat(self, session: ChatSession | None, text: str | None, upload: str | None, image_mode: str | None,
             model: str | None, temperature: float, top_p: float, max_new_tokens: int,
             request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """Add the user's question (and image) to the conversation and stream the answer."""
        session = session if isinstance(session, ChatSession) else ChatSession()
        text = (text or "").strip()
        if session.generating:  # a second submit while streaming (trigger_mode prevents it in the page)
            yield self._outputs(session)
            return
        if not text:
            gr.Warning("Type a question first." if upload is None else "Type a question about the image.")
            yield self._outputs(session)
            return
        image_mode = image_mode if image_mode in IMAGE_PROCESS_MODES else DEFAULT_IMAGE_PROCESS_MODE
        if upload:
            try:
                image = prepare_image(upload, limits=self.config.image_limits, images_dir=self.log.images_dir)
            except (ImageError, LlavaMedError) as exc:
                turn = Turn(user=text, status=TURN_ERROR, error=describe_error(exc), finished=time.time())
                session.turns.append(turn)
                self.log.log_chat(session, turn, params={}, ip=_client_ip(request))
                yield self._outputs(session, textbox="")
                return
            if session.image is None or image.source_sha256 != session.image.source_sha256:
                if session.turns:
                    gr.Info("A new image starts a new conversation.")
                    session = ChatSession()
                session.image = image
        session.image_process_mode = image_mode
        if len(text) > self.config.max_input_chars:
            turn = Turn(user=text[:200] + "…", status=TURN_ERROR, finished=time.time(),
                        error=f"**Your message is too long**: {len(text)} characters; the limit is "
                              f"{self.config.max_input_chars}.")
            session.turns.append(turn)
            self.log.log_chat(session, turn, params={}, ip=_client_ip(request))
            yield self._outputs(session)
            return
        session.voted = False
        session.turns.append(Turn(user=text))
        yield from self._stream(session, model, temperature, top_p, max_new_tokens, request, first_textbox="")

    def regenerate(self, session: ChatSession | None, image_mode: str | None, model: str | None, temperature: float,
                   top_p: float, max_new_tokens: int, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """Answer the last question again (with the current model, preprocessing and parameters)."""
        session = session if isinstance(session, ChatSession) else ChatSession()
        if not session.turns or session.generating:
            yield self._outputs(session)
            return
        if image_mode in IMAGE_PROCESS_MODES:
            session.image_process_mode = image_mode
        last = session.turns[-1]
        session.turns[-1] = Turn(user=last.user)
        session.voted = False
        yield from self._stream(session, model, temperature, top_p, max_new_tokens, request)

    def _stream(self, session: ChatSession, model: str | None, temperature: float, top_p: float,
                max_new_tokens: int, request: Any, first_textbox: Any = None) -> Iterator[tuple[Any, ...]]:
        turn = session.turns[-1]
        session.stop_requested = False
        session.streaming = True
        params = {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens)}
        yield self._outputs(session, textbox=first_textbox)
        stream = None
        client = self.client()
        try:
            if not model:
                models = client.list_models()
                if not models:
                    raise NoWorkerError(f"no worker is registered with the controller at "
                                        f"{self.config.controller_url}")
                model = models[0]
            turn.model = model
            address = client.get_worker_address(model)
            conv_mode = client.conv_mode_for(address, self.config.conv_mode)
            turn.conv_mode = conv_mode
            rendered = build_prompt(conv_mode, session, turn)
            logger.info("conv %s: %s via %s, template %s, %d image(s)", session.conv_id[:8], model, address,
                        conv_mode, len(rendered.images))
            worker = self.client(worker_url=address)
            client.close()
            client = worker
            stream = client.generate_stream(
                model, rendered.prompt, rendered.images,
                temperature=params["temperature"], top_p=max(params["top_p"], 0.01),
                max_new_tokens=max(params["max_new_tokens"], 1), stop=list(rendered.stop), echo=False,
                image_process_mode=session.image_process_mode,
            )
            for chunk in stream:
                if session.stop_requested:
                    break
                turn.answer = chunk.output.strip()
                yield self._outputs(session)
            turn.status = TURN_STOPPED if session.stop_requested else TURN_DONE
        except (ClientError, LlavaMedError) as exc:
            turn.status = TURN_ERROR
            turn.error = describe_error(exc, model=model, controller_url=self.config.controller_url)
            logger.info("conv %s: %s", session.conv_id[:8], turn.error)
        except Exception as exc:
            logger.exception("generation failed")
            turn.status = TURN_ERROR
            turn.error = describe_error(exc)
        finally:
            # Runs on normal end, on errors, and when Gradio cancels the event (Stop): closing the stream closes
            # the HTTP connection, and the worker cancels the request.
            if stream is not None:
                stream.close()
            client.close()
            if turn.status == TURN_STREAMING:
                turn.status = TURN_STOPPED
            turn.finished = time.time()
            session.streaming = False
            try:
                self.log.log_chat(session, turn, params=params, ip=_client_ip(request))
            except OSError:
                logger.exception("cannot write the conversation log")
        yield self._outputs(session)

    def stop(self, session: ChatSession | None) -> tuple[Any, ...]:
        """The Stop button. Its click also cancels the running event; this handler sets the session's stop flag
        (the stream ends at its next chunk even if the cancellation comes late) and waits, briefly, for the stream
        to end, so that no update of the cancelled event lands after the page's buttons were reset."""
        session = session if isinstance(session, ChatSession) else ChatSession()
        session.stop_requested = True
        deadline = time.monotonic() + STOP_WAIT
        while session.streaming and time.monotonic() < deadline:
            time.sleep(0.02)
        if session.generating:
            session.turns[-1].status = TURN_STOPPED
        return self._outputs(session)

    def clear(self) -> tuple[Any, ...]:
        session = ChatSession()
        return (*self._outputs(session, textbox=""), None, None, "")

    def vote(self, kind: str, session: ChatSession | None, model: str | None, request: gr.Request) -> tuple[Any, ...]:
        session = session if isinstance(session, ChatSession) else ChatSession()
        if not session.turns or session.generating:
            return self._outputs(session)
        last = session.turns[-1]
        self.log.log_vote(kind, session, model=last.model or model, ip=_client_ip(request))
        session.voted = True
        gr.Info({"upvote": "Thanks for the upvote.", "downvote": "Thanks for the feedback.",
                 "flag": "Flagged for review."}[kind])
        return self._outputs(session)

    def upvote(self, session: ChatSession | None, model: str | None, request: gr.Request) -> tuple[Any, ...]:
        return self.vote("upvote", session, model, request)

    def downvote(self, session: ChatSession | None, model: str | None, request: gr.Request) -> tuple[Any, ...]:
        return self.vote("downvote", session, model, request)

    def flag(self, session: ChatSession | None, model: str | None, request: gr.Request) -> tuple[Any, ...]:
        return self.vote("flag", session, model, request)

    def refresh_models(self, current: str | None) -> Any:
        try:
            models = self._fetch_models()
        except ClientError as exc:
            gr.Warning(f"Cannot get the model list from the controller at {self.config.controller_url}: {exc}")
            models = []
        if not models:
            gr.Warning("No model is available: no worker is registered with the controller.")
        value = current if current in models else (models[0] if models else None)
        return gr.update(choices=models, value=value)

    def preview(self, upload: str | None) -> tuple[Any, str]:
        """Show the decoded upload (DICOM rendered with its window), or say why it cannot be used."""
        if not upload:
            return None, ""
        try:
            image = load_image(Path(upload).read_bytes(), limits=self.config.image_limits)
        except (ImageError, LlavaMedError, OSError) as exc:
            message = describe_error(exc if isinstance(exc, (ImageError, LlavaMedError)) else ImageError(str(exc)))
            gr.Warning(message.replace("**", ""))
            return None, f"⚠️ {message}"
        return image, f"{Path(upload).name}: {image.width}×{image.height}"

    # ---------------------------------------------------------------------------------------- layout
    def _build(self) -> Any:
        cfg = self.config
        with gr.Blocks(title="LLaVA-Med", analytics_enabled=False, fill_height=True) as demo:
            state = gr.State(None)
            if not cfg.embed:
                gr.Markdown("# LLaVA-Med: a large language-and-vision assistant for biomedicine")
            gr.Markdown(f"**Research use only.** {RESEARCH_ONLY_NOTICE}", elem_id="llava-med-notice")
            with gr.Row(equal_height=False):
                with gr.Column(scale=4, min_width=300):
                    with gr.Row(equal_height=True):
                        model = gr.Dropdown(
                            choices=self.initial_models, value=self.initial_models[0] if self.initial_models else None,
                            label="Model", interactive=True, allow_custom_value=True, scale=8,
                            elem_id="llava-med-model",
                        )
                        refresh = gr.Button("↻", scale=1, min_width=44, elem_id="llava-med-refresh")
                    upload = gr.File(label=f"Image ({SUPPORTED_IMAGES_TEXT})", file_types=UPLOAD_FILE_TYPES,
                                     type="filepath", height=110, elem_id="llava-med-upload")
                    preview = gr.Image(label="Preview", type="pil", interactive=False, height=230,
                                       elem_id="llava-med-preview", buttons=[])
                    upload_status = gr.Markdown("", elem_id="llava-med-upload-status")
                    image_mode = gr.Radio(list(IMAGE_PROCESS_MODES), value=DEFAULT_IMAGE_PROCESS_MODE,
                                          label="Preprocess for non-square image",
                                          info="Default: the checkpoint's setting (Pad for LLaVA-Med v1.5)")
                    with gr.Accordion("Parameters", open=False):
                        temperature = gr.Slider(0.0, 1.0, value=CHAT_DEFAULTS.temperature, step=0.1, label="Temperature",
                                                elem_id="llava-med-temperature")
                        top_p = gr.Slider(0.05, 1.0, value=CHAT_DEFAULTS.top_p, step=0.05, label="Top P", elem_id="llava-med-top-p")
                        max_tokens = gr.Slider(8, 1024, value=CHAT_DEFAULTS.max_new_tokens, step=8, label="Max output tokens",
                                               elem_id="llava-med-max-tokens")
                with gr.Column(scale=8):
                    chatbot = gr.Chatbot(label="LLaVA-Med", elem_id="llava-med-chat", height=520,
                                         placeholder="Upload an image, or pick an example, and ask a question.",
                                         buttons=["copy"], feedback_options=None, layout="bubble")
                    with gr.Row():
                        textbox = gr.Textbox(show_label=False, placeholder="Ask about the image and press Enter",
                                             scale=8, container=False, elem_id="llava-med-input", max_lines=6,
                                             autofocus=True)
                        send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="llava-med-send")
                        stop = gr.Button("■ Stop", variant="stop", scale=1, min_width=90, visible=False,
                                         elem_id="llava-med-stop")
                    with gr.Row():
                        small = {"size": "sm", "min_width": 70}
                        upvote = gr.Button("▲ Upvote", interactive=False, elem_id="llava-med-upvote", **small)
                        downvote = gr.Button("▼ Downvote", interactive=False, elem_id="llava-med-downvote", **small)
                        flag = gr.Button("⚑ Flag", interactive=False, elem_id="llava-med-flag", **small)
                        regenerate = gr.Button("↻ Regenerate", interactive=False, elem_id="llava-med-regenerate",
                                               **small)
                        clear = gr.Button("✕ Clear", elem_id="llava-med-clear", **small)
            if self.examples:
                gr.Examples(examples=[[e.path, e.question] for e in self.examples], inputs=[upload, textbox],
                            label="Examples (real samples from installed packages, or drawn by code)",
                            example_labels=[f"{Path(e.path).name} ({e.source})" for e in self.examples])
            gr.Markdown(
                "Answers are generated by a model and may be wrong. Images and chats are logged on the server for "
                "research. Uploads: " + SUPPORTED_IMAGES_TEXT + ".", elem_classes=["llava-med-footer"],
            )

            outputs = [state, chatbot, textbox, send, stop, regenerate, clear, upvote, downvote, flag]
            params = [model, temperature, top_p, max_tokens]
            chat_event = gr.on(
                triggers=[textbox.submit, send.click], fn=self.chat,
                inputs=[state, textbox, upload, image_mode, *params], outputs=outputs,
                api_name="chat", concurrency_limit=cfg.concurrency_count, concurrency_id="generate",
                show_progress="hidden",
            )
            regen_event = regenerate.click(
                self.regenerate, inputs=[state, image_mode, *params], outputs=outputs, api_name="regenerate",
                concurrency_limit=cfg.concurrency_count, concurrency_id="generate", show_progress="hidden",
            )
            stop.click(self.stop, inputs=[state], outputs=outputs, cancels=[chat_event, regen_event],
                       api_name="stop", queue=False, show_progress="hidden")
            # Clear (and the chat's own trash icon) also cancels a running answer, as Stop does.
            clear.click(self.clear, inputs=None, outputs=[*outputs, upload, preview, upload_status],
                        cancels=[chat_event, regen_event], api_name="clear", queue=False, show_progress="hidden")
            chatbot.clear(self.clear, inputs=None, outputs=[*outputs, upload, preview, upload_status],
                          cancels=[chat_event, regen_event], api_visibility="private", queue=False,
                          show_progress="hidden")
            for button, handler, name in ((upvote, self.upvote, "upvote"), (downvote, self.downvote, "downvote"),
                                          (flag, self.flag, "flag")):
                button.click(handler, inputs=[state, model], outputs=outputs, api_name=name, queue=False,
                             show_progress="hidden")
            upload.change(self.preview, inputs=[upload], outputs=[preview, upload_status], api_name="preview",
                          show_progress="hidden")
            refresh.click(self.refresh_models, inputs=[model], outputs=[model], api_name="refresh_models",
                          queue=False)
            if cfg.model_list_mode == "reload":
                demo.load(self.refresh_models, inputs=[model], outputs=[model], api_visibility="private",
                          queue=False)
        demo.queue(default_concurrency_limit=cfg.concurrency_count)
        return demo

    # ---------------------------------------------------------------------------------------- serving
    def mount_options(self) -> dict[str, Any]:
        """Keyword arguments shared by ``gr.mount_gradio_app`` and ``Blocks.launch``."""
        self.log.images_dir.mkdir(parents=True, exist_ok=True)
        allowed = [str(self.log.images_dir.resolve())]
        if self.config.examples_dir is not None:
            allowed.append(str(Path(self.config.examples_dir).resolve()))
        return {
            "allowed_paths": allowed,
            "max_file_size": self.config.max_image_bytes,
            "theme": gr.themes.Soft(
                primary_hue="teal",
                font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
            ),
            "css": CSS,
            "footer_links": ["api"],
            "ssr_mode": False,
            "mcp_server": False,
        }


def _client_ip(request: Any) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)


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

