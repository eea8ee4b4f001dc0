"""What the page does when the user acts: upload, window and slice, ask, stop, regenerate, clear, vote, retry.

Handlers return dicts ``{component: value}`` over the components of :class:`Components` (built by
:mod:`llava_med.serve.web.ui`), so each one changes only what it must. Every problem is shown once, where the user
looks: upload problems in the image panel, answer problems in the chat, an unreachable controller (or one without
workers) in the banner with a Retry button; library texts never reach the page (they go to the server's log).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from llava_med.errors import ImageError, LlavaMedError
from llava_med.serve.client import ClientConnectionError, ClientError, ClientTimeoutError, LlavaMedClient, NoWorkerError
from llava_med.serve.protocol import default_auth_token
from llava_med.serve.web.chat_log import ConversationLog
from llava_med.serve.web.config import (
    CONTROL_TIMEOUT,
    DEFAULT_IMAGE_PROCESS_MODE,
    IMAGE_PROCESS_MODES,
    STOP_WAIT,
    TURN_DONE,
    TURN_ERROR,
    TURN_STOPPED,
    TURN_STREAMING,
    WebConfig,
)
from llava_med.serve.web.examples import Example
from llava_med.serve.web.export import write_exports
from llava_med.serve.web.messages import chatbot_messages, controller_banner, describe_error
from llava_med.serve.web.session import ChatSession, Turn, build_prompt
from llava_med.serve.web.upload import PanelImage, describe_upload_error, discard_upload, read_upload

try:
    import gradio as gr
except ImportError:  # pragma: no cover - the web UI needs the 'web' extra
    gr = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["Components", "Handlers"]

Update = dict[Any, Any]


@dataclasses.dataclass
class Components:
    """The page's components that handlers read or change (set by :meth:`WebUI._build`)."""

    state: Any = None
    panel: Any = None
    banner: Any = None
    banner_text: Any = None
    retry: Any = None
    model: Any = None
    refresh: Any = None
    preview: Any = None
    upload: Any = None
    upload_status: Any = None
    dicom_info: Any = None
    window: Any = None
    slice: Any = None
    image_mode: Any = None
    temperature: Any = None
    top_p: Any = None
    max_tokens: Any = None
    chatbot: Any = None
    textbox: Any = None
    send: Any = None
    stop: Any = None
    regenerate: Any = None
    clear: Any = None
    upvote: Any = None
    downvote: Any = None
    flag: Any = None
    feedback: Any = None
    export_md: Any = None
    export_json: Any = None

    def chat_outputs(self) -> list[Any]:
        return [self.state, self.chatbot, self.textbox, self.send, self.stop, self.regenerate, self.clear,
                self.upvote, self.downvote, self.flag, self.feedback, self.export_md, self.export_json, self.banner,
                self.banner_text, self.model]

    def panel_outputs(self) -> list[Any]:
        return [self.panel, self.preview, self.upload, self.upload_status, self.dicom_info, self.window, self.slice]


class _ControllerDown(Exception):
    """The controller cannot be reached, or has no worker at all: shown in the banner, not in the chat."""

    def __init__(self, reachable: bool) -> None:
        super().__init__("no worker" if reachable else "unreachable")
        self.reachable = reachable


class Handlers:
    """The handlers of :class:`llava_med.serve.web.ui.WebUI` (state: the config, the log, the components)."""

    config: WebConfig
    log: ConversationLog
    c: Components
    examples: list[Example]
    exports_dir: Path

    # ------------------------------------------------------------------------------------------ controller
    def client(self, worker_url: str | None = None, timeout: float | None = None) -> LlavaMedClient:
        return LlavaMedClient(self.config.controller_url, worker_url=worker_url,
                              timeout=timeout or self.config.request_timeout, auth_token=default_auth_token())

    def fetch_models(self) -> list[str]:
        """The controller's models, after asking it to refresh its workers (raises ClientError)."""
        with self.client(timeout=CONTROL_TIMEOUT) as client:
            client.refresh_all_workers()
            return client.list_models()

    def controller_state(self) -> tuple[list[str], bool]:
        """(models, reachable); the cause of a failure goes to the server's log only."""
        try:
            return self.fetch_models(), True
        except ClientError as exc:
            logger.warning("cannot get the model list from %s: %s", self.config.controller_url, exc)
            return [], False

    def _banner(self, models: Sequence[str], reachable: bool) -> Update:
        problem = not reachable or not models
        text = controller_banner(self.config.controller_url, reachable=reachable) if problem else ""
        return {self.c.banner: gr.update(visible=problem), self.c.banner_text: text}

    def refresh_models(self, current: str | None) -> Update:
        """The ↻ and Retry buttons (and page loads): ask the controller again; the banner says what is wrong."""
        models, reachable = self.controller_state()
        value = current if current in models else (models[0] if models else None)
        return {self.c.model: gr.update(choices=models, value=value), **self._banner(models, reachable)}

    # ------------------------------------------------------------------------------------------ image panel
    def upload(self, files: Any) -> Update:
        """New file(s) dropped, pasted or chosen: they replace the panel's image; a problem leaves it as it was."""
        paths = [f for f in (files if isinstance(files, (list, tuple)) else [files]) if f]
        if not paths:
            return {}
        try:
            new = read_upload(paths, self.config)
        except (ImageError, LlavaMedError, OSError) as exc:
            name = Path(paths[0]).name if len(paths) == 1 else f"These {len(paths)} files"
            logger.info("upload refused: %s: %s", type(exc).__name__, exc)
            problem = html.escape(describe_upload_error(exc, name, self.config))
            return {self.c.upload: gr.update(value=None),
                    self.c.upload_status: f'<p class="llava-med-problem" role="alert">⚠️ {problem}</p>'}
        finally:
            discard_upload(paths)
        return self._panel_view(new)

    def load_example(self, index: int) -> Update:
        example = self.examples[index]
        try:
            new = read_upload([example.path], self.config)
        except (ImageError, LlavaMedError, OSError) as exc:
            logger.warning("example %s cannot be loaded: %s", example.path, exc)
            return {}
        return {**self._panel_view(new), self.c.textbox: example.question}

    def choose_window(self, window: str | None, panel: PanelImage | None) -> Update:
        if not isinstance(panel, PanelImage) or not panel.is_dicom or not window:
            return {}
        return self._panel_view(panel.rerender(window=window, config=self.config), reset_upload=False)

    def choose_slice(self, number: float | None, panel: PanelImage | None) -> Update:
        if not isinstance(panel, PanelImage) or panel.stack is None or number is None:
            return {}
        return self._panel_view(panel.rerender(index=int(number) - 1, config=self.config), reset_upload=False)

    def _panel_view(self, panel: PanelImage | None, *, reset_upload: bool = True) -> Update:
        c = self.c
        if panel is None:
            return {c.panel: None, c.preview: gr.update(value=None, visible=False),
                    c.upload: gr.update(value=None, elem_classes=[]), c.upload_status: "",
                    c.dicom_info: gr.update(value="", visible=False),
                    c.window: gr.update(visible=False), c.slice: gr.update(visible=False)}
        choices = panel.window_choices()
        status = (f"<p><b>{html.escape(panel.name)}</b>: {panel.image.width}×{panel.image.height} px, as the model "
                  "will see it.</p>")
        if panel.note:
            status += f"<p>{html.escape(panel.note)}.</p>"
        view = {
            c.panel: panel,
            c.preview: gr.update(value=_pil(panel), visible=True),
            c.upload_status: status,
            c.dicom_info: gr.update(value=_info_table(panel), visible=panel.info is not None),
            c.window: gr.update(choices=choices, value=panel.window if choices else None, visible=bool(choices)),
            c.slice: gr.update(minimum=1, maximum=max(panel.slices, 2), value=(panel.index or 0) + 1, step=1,
                               visible=panel.slices > 1, label=f"Slice (of {panel.slices})"),
        }
        if reset_upload:
            view[c.upload] = gr.update(value=None, elem_classes=["llava-med-drop-slim"])
        return view

    # ------------------------------------------------------------------------------------------ chat
    def chat(self, session: ChatSession | None, panel: PanelImage | None, text: str | None, image_mode: str | None,
             model: str | None, temperature: float, top_p: float, max_new_tokens: int,
             request: gr.Request = None) -> Iterator[Update]:
        """Add the question (with the panel's image) to the conversation and stream the answer."""
        session = session if isinstance(session, ChatSession) else ChatSession()
        text = (text or "").strip()
        if session.generating:  # a second submit while streaming
            yield self._chat_view(session)
            return
        if not text:
            yield {**self._chat_view(session), self.c.feedback: "Type a question first."}
            return
        if len(text) > self.config.max_input_chars:  # the page's counter stops this before; API callers get this
            raise gr.Error(f"The question is {len(text):,} characters long; the limit is "
                           f"{self.config.max_input_chars:,}. Shorten it and send it again.")
        notice = ""
        image = panel.image if isinstance(panel, PanelImage) else None
        if image is not None and (session.image is None or image.sha256 != session.image.sha256):
            if session.turns:
                notice = "A new image: a new conversation started."
                session = ChatSession()
            session.image = dataclasses.replace(image.saved(self.log.images_dir), details=panel.description(),
                                                fields=panel.wire_options())
        session.image_process_mode = image_mode if image_mode in IMAGE_PROCESS_MODES else DEFAULT_IMAGE_PROCESS_MODE
        session.voted = False
        turn = Turn(user=text)
        session.turns.append(turn)

        def undo() -> Update:
            session.turns.remove(turn)
            return {self.c.textbox: text}

        yield from self._stream(session, model, temperature, top_p, max_new_tokens, request, undo,
                                first={self.c.textbox: "", self.c.feedback: notice})

    def regenerate(self, session: ChatSession | None, image_mode: str | None, model: str | None, temperature: float,
                   top_p: float, max_new_tokens: int, request: gr.Request = None) -> Iterator[Update]:
        """Answer the last question again (with the current model, preprocessing and parameters)."""
        session = session if isinstance(session, ChatSession) else ChatSession()
        if not session.can_regenerate:
            yield self._chat_view(session)
            return
        if image_mode in IMAGE_PROCESS_MODES:
            session.image_process_mode = image_mode
        previous = session.turns[-1]
        session.turns[-1] = Turn(user=previous.user)
        session.voted = False

        def undo() -> Update:
            session.turns[-1] = previous
            return {}

        yield from self._stream(session, model, temperature, top_p, max_new_tokens, request, undo)

    def _stream(self, session: ChatSession, model: str | None, temperature: float, top_p: float,
                max_new_tokens: int, request: Any, undo: Callable[[], Update],
                first: Update | None = None) -> Iterator[Update]:
        turn = session.turns[-1]
        session.stop_requested = False
        session.streaming = True
        turn.params = {"temperature": float(temperature), "top_p": float(top_p),
                       "max_new_tokens": int(max_new_tokens)}
        yield {**self._chat_view(session), **(first or {})}
        stream = None
        client = self.client()
        logged = True
        try:
            model, address = self._route(client, model)
            turn.model = model
            turn.conv_mode = client.conv_mode_for(address, self.config.conv_mode)
            rendered = build_prompt(turn.conv_mode, session, turn)
            logger.info("conv %s: %s via %s, template %s, %d image(s)", session.conv_id[:8], model, address,
                        turn.conv_mode, len(rendered.images))
            worker = self.client(worker_url=address)
            client.close()
            client = worker
            extra = session.image.fields if session.image is not None and rendered.images else {}
            stream = client.generate_stream(
                model, rendered.prompt, rendered.images, temperature=turn.params["temperature"],
                top_p=max(turn.params["top_p"], 0.01), max_new_tokens=max(turn.params["max_new_tokens"], 1),
                stop=list(rendered.stop), echo=False, image_process_mode=session.image_process_mode, **extra,
            )
            for chunk in stream:
                if session.stop_requested:
                    break
                turn.answer = chunk.output.strip()
                yield self._chat_view(session)
            turn.status = TURN_STOPPED if session.stop_requested else TURN_DONE
        except _ControllerDown as down:
            logged = False
            session.streaming = False
            update = undo()
            yield {**self._chat_view(session), **update,
                   **self._banner([], down.reachable)}
            return
        except (ClientError, LlavaMedError) as exc:
            turn.status = TURN_ERROR
            turn.error = describe_error(exc, model=model)
            logger.info("conv %s: %s: %s", session.conv_id[:8], type(exc).__name__, exc)
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
            if logged:
                try:
                    self.log.log_chat(session, turn, ip=_client_ip(request))
                except OSError:
                    logger.exception("cannot write the conversation log")
        yield self._chat_view(session, final=True)

    def _route(self, client: LlavaMedClient, model: str | None) -> tuple[str, str]:
        """(model, worker address); :class:`_ControllerDown` when the controller is down or has no worker."""
        try:
            if not model:
                models = client.list_models()
                if not models:
                    raise _ControllerDown(reachable=True)
                model = models[0]
            try:
                return model, client.get_worker_address(model)
            except NoWorkerError:
                if not client.list_models():
                    raise _ControllerDown(reachable=True) from None
                raise
        except (ClientConnectionError, ClientTimeoutError) as exc:
            logger.warning("the controller at %s cannot be reached: %s", self.config.controller_url, exc)
            raise _ControllerDown(reachable=False) from exc

    def _chat_view(self, session: ChatSession, *, final: bool = False) -> Update:
        c = self.c
        idle = not session.generating
        last = session.turns[-1] if session.turns else None
        can_vote = idle and last is not None and last.status in (TURN_DONE, TURN_STOPPED) and not session.voted
        view = {
            c.state: session,
            c.chatbot: chatbot_messages(session),
            c.send: gr.update(visible=idle),
            c.stop: gr.update(visible=not idle),
            c.regenerate: gr.update(interactive=idle and session.can_regenerate),
            c.clear: gr.update(interactive=idle),
            c.upvote: gr.update(interactive=can_vote),
            c.downvote: gr.update(interactive=can_vote),
            c.flag: gr.update(interactive=can_vote),
        }
        if final or not session.turns:
            view.update(self._export_view(session))
            view[c.banner] = gr.update(visible=False)
        return view

    def _export_view(self, session: ChatSession) -> Update:
        if not session.turns or session.generating:
            return {self.c.export_md: gr.update(value=None, interactive=False),
                    self.c.export_json: gr.update(value=None, interactive=False)}
        try:
            markdown, as_json = write_exports(session, self.exports_dir)
        except OSError:
            logger.exception("cannot write the conversation export")
            return {}
        return {self.c.export_md: gr.update(value=markdown, interactive=True),
                self.c.export_json: gr.update(value=as_json, interactive=True)}

    def stop(self, session: ChatSession | None) -> Update:
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
        return self._chat_view(session, final=True)

    def clear(self) -> Update:
        """A new conversation: the chat, the image panel and the question box are emptied."""
        return {**self._chat_view(ChatSession()), **self._panel_view(None), self.c.textbox: "",
                self.c.feedback: ""}

    def vote(self, kind: str, session: ChatSession | None, model: str | None, request: Any = None) -> Update:
        session = session if isinstance(session, ChatSession) else ChatSession()
        if not session.turns or session.generating or session.voted:
            return self._chat_view(session)
        last = session.turns[-1]
        self.log.log_vote(kind, session, model=last.model or model, ip=_client_ip(request))
        session.voted = True
        said = {"upvote": "Upvote recorded.", "downvote": "Downvote recorded.",
                "flag": "Flag recorded: the answer will be reviewed."}[kind]
        return {**self._chat_view(session), self.c.feedback: f"✓ {said} Thank you."}

    def upvote(self, session: ChatSession | None, model: str | None, request: gr.Request = None) -> Update:
        return self.vote("upvote", session, model, request)

    def downvote(self, session: ChatSession | None, model: str | None, request: gr.Request = None) -> Update:
        return self.vote("downvote", session, model, request)

    def flag(self, session: ChatSession | None, model: str | None, request: gr.Request = None) -> Update:
        return self.vote("flag", session, model, request)


def _pil(panel: PanelImage) -> Image.Image:
    """The PNG the model will see, as a PIL image without metadata (what the preview shows)."""
    with Image.open(io.BytesIO(base64.b64decode(panel.image.b64))) as img:
        img.load()
        image = img.copy()
    image.info.clear()
    return image


def _info_table(panel: PanelImage) -> str:
    """The DICOM tags that say what the image is, as small labelled chips (empty for other images)."""
    if panel.info is None:
        return ""
    rows = [(k, v) for k, v in panel.info.summary() if k != "Frames"]  # the slice slider shows them
    chips = "".join(f'<span class="llava-med-tag"><b>{html.escape(k)}</b> {html.escape(v)}</span> ' for k, v in rows)
    return f'<div class="llava-med-tags">{chips}</div>' if chips else ""


def _client_ip(request: Any) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)
