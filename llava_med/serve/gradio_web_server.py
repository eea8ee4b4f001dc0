"""The web chat (Gradio 6): pick a model, upload an image (PNG, JPEG, DICOM, ...), ask, stream the answer.

Run: ``python -m llava_med.serve.gradio_web_server --controller-url http://localhost:21001`` (or ``llava-med web``),
then open http://127.0.0.1:7860. ``llava-med launch`` starts it together with a controller and workers.

How it works:

* The model list comes from the controller (``--model-list-mode once``: at start; ``reload``: at each page load;
  the refresh button asks again at any time).
* Each answer goes through :class:`llava_med.serve.client.LlavaMedClient`: the controller names a worker
  (``/get_worker_address``), the worker names its prompt template (``/worker_get_conv_template``), the prompt is
  built with that template from the chat history, and the answer is streamed from the worker. The image travels as
  base64 PNG with the chosen ``image_process_mode`` (Crop, Resize, Pad, Default); the worker applies it.
* **Stop** cancels the Gradio event; the generator then closes its HTTP stream, and the worker cancels the request
  at once (its queue length drops back). A stop flag on the session stops the stream too, so the worker is freed
  even if the cancellation arrives between two chunks.
* A bad image, no worker, a refused request (prompt too long, busy, ...) or a network error is shown in the chat as a
  message that names the cause; a traceback never reaches the page.
* Every finished answer (done, stopped or failed) and every vote/flag is appended as one JSON line to
  ``<log-dir>/<date>-conv.jsonl``; the images sent to the model are saved once, by content hash, as
  ``<log-dir>/images/<sha256>.png``.

State lives in a per-browser-session :class:`ChatSession` (``gr.State``) and in the :class:`WebUI` object; the
module has no mutable globals.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from llava_med.constants import (
    DEFAULT_CONTROLLER_URL,
    DEFAULT_HOST,
    DEFAULT_WEB_PORT,
    RESEARCH_ONLY_NOTICE,
    ErrorCode,
    worker_api_timeout,
)
from llava_med.conversation import DEFAULT_CONV_MODE, get_conv_template, template_names
from llava_med.errors import (
    ImageError,
    ImageTooLargeError,
    LlavaMedError,
    MissingDependencyError,
)
from llava_med.model.image_processing import (
    ImageLimits,
    encode_image_base64,
    image_sha256,
    load_image,
)
from llava_med.serve.client import (
    ClientConnectionError,
    ClientError,
    ClientTimeoutError,
    LlavaMedClient,
    NoWorkerError,
    WorkerError,
)

try:  # the web UI is an optional extra: pip install 'llava-med-serve[web]'
    import gradio as gr
except ImportError:  # pragma: no cover - exercised only without the extra
    gr = None  # type: ignore[assignment]

__all__ = [
    "IMAGE_PROCESS_MODES",
    "ChatSession",
    "ConversationLog",
    "Example",
    "SessionImage",
    "Turn",
    "WebConfig",
    "WebUI",
    "build_demo",
    "build_parser",
    "build_prompt",
    "create_app",
    "describe_error",
    "draw_chest_xray",
    "draw_histology",
    "main",
    "parse_args",
    "prepare_examples",
    "prepare_image",
    "render_chat",
]

logger = logging.getLogger(__name__)

#: The preprocessing choices of the original web UI; the worker applies them (``image_process_mode``).
IMAGE_PROCESS_MODES = ("Crop", "Resize", "Pad", "Default")
DEFAULT_IMAGE_PROCESS_MODE = "Default"
DEFAULT_LOG_DIR = "logs/web"
DEFAULT_CONCURRENCY_COUNT = 16
DEFAULT_MAX_INPUT_CHARS = 4000
#: Images are downscaled to this longest side before they are sent (CLIP sees 336 px; the original UI did the same).
MAX_SEND_SIDE = 1344
#: Seconds allowed for the small control requests (model list, worker address, template).
CONTROL_TIMEOUT = 10.0
STREAMING_CURSOR = "▌"
#: Seconds the Stop handler waits for the cancelled stream to end before it resets the buttons.
STOP_WAIT = 3.0
#: Seconds the server waits for open connections (pages keep a heartbeat stream) when it stops.
WEB_GRACEFUL_SHUTDOWN = 1
SUPPORTED_IMAGES_TEXT = "PNG, JPEG, TIFF, WebP, BMP, GIF or DICOM (.dcm)"
UPLOAD_FILE_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".dcm", ".dicom"]

TURN_STREAMING = "streaming"
TURN_DONE = "done"
TURN_STOPPED = "stopped"
TURN_ERROR = "error"


def _require_gradio() -> Any:
    if gr is None:
        raise MissingDependencyError(
            "the web UI needs gradio 6: pip install 'gradio>=6,<7' (or pip install -e '.[web]')"
        )
    return gr


# ---------------------------------------------------------------------------------------------------------------
# Session state


@dataclasses.dataclass(frozen=True)
class SessionImage:
    """The image of a conversation, as it is sent to the model."""

    sha256: str  # of the PNG bytes sent (the name of the saved file)
    source_sha256: str  # of the uploaded file's bytes (tells a new upload from the same one)
    b64: str  # base64 PNG, what the worker receives
    name: str  # the uploaded file's name
    width: int
    height: int
    path: str | None = None  # the saved copy (shown in the chat)


@dataclasses.dataclass
class Turn:
    """One question and its answer."""

    user: str
    answer: str = ""
    status: str = TURN_STREAMING  # streaming | done | stopped | error
    error: str | None = None
    model: str | None = None
    conv_mode: str | None = None
    started: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None


@dataclasses.dataclass
class ChatSession:
    """What one browser tab chats about (kept in ``gr.State``; mutated in place by the handlers)."""

    conv_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    turns: list[Turn] = dataclasses.field(default_factory=list)
    image: SessionImage | None = None
    image_process_mode: str = DEFAULT_IMAGE_PROCESS_MODE
    stop_requested: bool = False
    voted: bool = False
    streaming: bool = False  # a handler is streaming an answer for this session (set and cleared by it)

    @property
    def generating(self) -> bool:
        return bool(self.turns) and self.turns[-1].status == TURN_STREAMING

    def history_turns(self) -> list[Turn]:
        """The answered turns that go into the next prompt (failed turns and empty answers are left out)."""
        return [t for t in self.turns if t.status in (TURN_DONE, TURN_STOPPED) and t.answer.strip()]

    def to_messages(self) -> list[dict[str, Any]]:
        """The chat as JSON-able messages (for the logs): the image is referred to by its hash."""
        out: list[dict[str, Any]] = []
        for i, turn in enumerate(self.turns):
            user: dict[str, Any] = {"role": "user", "content": turn.user}
            if i == 0 and self.image is not None:
                user["image"] = self.image.sha256
            out.append(user)
            assistant: dict[str, Any] = {"role": "assistant", "content": turn.answer, "status": turn.status}
            if turn.error:
                assistant["error"] = turn.error
            out.append(assistant)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (tested without a server)


def build_prompt(conv_mode: str, session: ChatSession, question_turn: Turn | None = None) -> tuple[str, str | None,
                                                                                                    list[str]]:
    """The prompt for the last turn of ``session`` (or ``question_turn``), its stop string, and the images.

    The history is the session's answered turns (failed turns are left out), the question is the last turn; the
    image goes with the first user message of the prompt, as LLaVA-Med was trained.
    """
    conv = get_conv_template(conv_mode)
    turn = question_turn if question_turn is not None else session.turns[-1]
    history = [t for t in session.history_turns() if t is not turn]
    image = session.image
    images = [image.b64] if image is not None else []
    for i, past in enumerate([*history, turn]):
        if i == 0 and image is not None:
            conv.append_message(conv.roles[0], (past.user, [image.b64], session.image_process_mode))
        else:
            conv.append_message(conv.roles[0], past.user)
        conv.append_message(conv.roles[1], None if past is turn else past.answer)
    return conv.get_prompt(), conv.stop_str, images


def _answer_markdown(turn: Turn) -> str:
    if turn.status == TURN_ERROR:
        return f"⚠️ {turn.error or 'unknown error'}"
    if turn.status == TURN_STREAMING:
        return turn.answer + STREAMING_CURSOR
    if turn.status == TURN_STOPPED:
        return (turn.answer + "\n\n" if turn.answer else "") + "*(stopped)*"
    return turn.answer


def render_chat(session: ChatSession | None) -> list[dict[str, Any]]:
    """The session as Gradio ``Chatbot`` messages (``{"role", "content"}``); the image is shown once, first."""
    if session is None:
        return []
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(session.turns):
        if i == 0 and session.image is not None and session.image.path:
            messages.append({"role": "user", "content": {"path": session.image.path,
                                                         "orig_name": session.image.name}})
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": _answer_markdown(turn)})
    return messages


def describe_error(exc: BaseException, *, model: str | None = None, controller_url: str | None = None) -> str:
    """A one-paragraph Markdown message naming the cause of a failed answer (shown in the chat)."""
    where = f" at {controller_url}" if controller_url else ""
    if isinstance(exc, NoWorkerError):
        return (f"**No worker is serving model `{model}`.** {_sentence(exc.message)} Start a worker for it, or pick "
                "another model and press ↻ to refresh the list.")
    if isinstance(exc, WorkerError):
        code = exc.error_code
        name = code.name if isinstance(code, ErrorCode) else "UNKNOWN"
        hints = {
            ErrorCode.BAD_IMAGE: ("The worker could not use the image", f" Upload a {SUPPORTED_IMAGES_TEXT} file."),
            ErrorCode.IMAGE_COUNT_MISMATCH: ("The prompt and the images do not match", ""),
            ErrorCode.CONTEXT_OVERFLOW: ("The conversation is too long for the model",
                                         (" Press **Clear** to start a new conversation, or lower *Max output "
                                          "tokens*.")),
            ErrorCode.ENGINE_OVERLOADED: ("The worker is busy", " Try again in a moment."),
            ErrorCode.BAD_REQUEST: ("The worker refused the request", ""),
            ErrorCode.PARAM_OUT_OF_RANGE: ("A parameter is out of range", ""),
            ErrorCode.INVALID_MODEL: ("Unknown model", " Press ↻ to refresh the model list."),
            ErrorCode.OUT_OF_MEMORY: ("The worker ran out of memory",
                                      " Try a shorter conversation or fewer output tokens."),
            ErrorCode.WORKER_UNREACHABLE: ("The worker cannot be reached", " It may have stopped; try again."),
            ErrorCode.CONTROLLER_WORKER_TIMEOUT: ("The worker did not answer in time", ""),
            ErrorCode.CONTROLLER_NO_WORKER: (f"No worker is serving model `{model}`", ""),
        }
        title, hint = hints.get(code, ("The worker reported an error", "")) if isinstance(code, ErrorCode) else (
            "The worker reported an error", "")
        return f"**{title}** (error {int(exc.code)} {name}): {_sentence(exc.message)}{hint}"
    if isinstance(exc, ClientTimeoutError):
        return f"**The server did not answer in time**: {exc}. The model may be overloaded; try again."
    if isinstance(exc, ClientConnectionError):
        return f"**Cannot reach the server{where}**: {exc}. Is the controller running?"
    if isinstance(exc, ImageTooLargeError):
        return f"**The image is too large**: {exc}."
    if isinstance(exc, ImageError):
        return f"**The image cannot be read**: {exc}. Upload a {SUPPORTED_IMAGES_TEXT} file."
    if isinstance(exc, (ClientError, LlavaMedError)):
        return f"**Error**: {exc}"
    return f"**Unexpected error** ({type(exc).__name__}): {exc}"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def prepare_image(path: str | os.PathLike[str], *, limits: ImageLimits | None = None,
                  images_dir: Path | None = None) -> SessionImage:
    """Decode an uploaded file (any supported image, DICOM included) into the PNG that is sent to the model.

    Raises :class:`ImageError` (or a subclass) with a message naming the problem. With ``images_dir`` the PNG is
    saved there once, as ``<sha256>.png``.
    """
    limits = limits or ImageLimits()
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"{path.name} is {size} bytes, over the limit of {limits.max_bytes} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read the uploaded file {path.name}: {exc}") from exc
    image = load_image(data, limits=limits)
    if max(image.size) > MAX_SEND_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SEND_SIDE, MAX_SEND_SIDE), Image.Resampling.LANCZOS)
    b64 = encode_image_base64(image)
    png = base64.b64decode(b64)
    sha = image_sha256(png)
    saved = None
    if images_dir is not None:
        saved = str(_save_once(images_dir / f"{sha}.png", png))
    return SessionImage(sha256=sha, source_sha256=image_sha256(data), b64=b64, name=path.name,
                        width=image.width, height=image.height, path=saved)


def _save_once(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` unless it exists (atomic: a temp file renamed into place)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


class ConversationLog:
    """Append-only JSON-lines log of chats and votes (``<dir>/<YYYY-MM-DD>-conv.jsonl``), images by hash."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(log_dir)
        self.images_dir = self.dir / "images"
        self._lock = threading.Lock()

    def path_for(self, when: float | None = None) -> Path:
        day = datetime.datetime.fromtimestamp(time.time() if when is None else when)
        return self.dir / f"{day:%Y-%m-%d}-conv.jsonl"

    def append(self, record: dict[str, Any]) -> None:
        record = {"tstamp": round(time.time(), 4), **record}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.path_for(record["tstamp"]), "a", encoding="utf-8") as fh:
                fh.write(line)

    def log_chat(self, session: ChatSession, turn: Turn, *, params: dict[str, Any], ip: str | None) -> None:
        self.append({
            "type": "chat",
            "conv_id": session.conv_id,
            "turn": next((i for i, t in enumerate(session.turns) if t is turn), None),
            "model": turn.model,
            "conv_mode": turn.conv_mode,
            "status": turn.status,
            "error": turn.error,
            "start": round(turn.started, 4),
            "finish": round(turn.finished or time.time(), 4),
            "params": params,
            "images": [session.image.sha256] if session.image is not None else [],
            "image_process_mode": session.image_process_mode,
            "messages": session.to_messages(),
            "ip": ip,
        })

    def log_vote(self, kind: str, session: ChatSession, *, model: str | None, ip: str | None) -> None:
        self.append({
            "type": kind,
            "conv_id": session.conv_id,
            "turn": len(session.turns) - 1,
            "model": model,
            "images": [session.image.sha256] if session.image is not None else [],
            "messages": session.to_messages(),
            "ip": ip,
        })


# ---------------------------------------------------------------------------------------------------------------
# Examples: real biomedical images found at run time (never bundled), or drawn by code


@dataclasses.dataclass(frozen=True)
class Example:
    path: str
    question: str
    source: str


def draw_chest_xray(size: int = 512, seed: int = 0) -> Image.Image:
    """A synthetic frontal chest radiograph (drawn by code: no patient data, no third-party file)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.06, np.float32)
    thorax = ((x - 0.5) / 0.46) ** 2 + ((y - 0.62) / 0.55) ** 2 < 1
    img[thorax] = 0.52 + 0.08 * (1 - np.abs(x[thorax] - 0.5) * 2)
    for cx, tilt in ((0.31, 1.0), (0.69, -1.0)):  # lung fields, darker towards the apex and the sides
        lung = ((x - cx) / 0.155) ** 2 + ((y - 0.52 - 0.02 * tilt * (x - cx)) / 0.31) ** 2 < 1
        lung &= y < 0.80 - 0.05 * np.abs(x - cx) / 0.15
        img[lung] = 0.16 + 0.10 * (y[lung] - 0.25)
    heart = ((x - 0.56) / 0.15) ** 2 + ((y - 0.66) / 0.13) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.58)
    spine = np.abs(x - 0.5) < 0.035
    img[spine & thorax] = np.maximum(img[spine & thorax], 0.70)
    ribs = np.zeros_like(img)
    for k in range(9):  # posterior ribs: arcs descending laterally
        for side in (-1, 1):
            dx = np.abs(x - 0.5)
            d = dx - 0.04
            arc = 0.20 + 0.056 * k + 0.55 * d - 0.75 * d ** 2
            band = (np.abs(y - arc) < 0.009) & (dx > 0.04) & (dx < 0.40) & (np.sign(x - 0.5) == side)
            ribs[band] = 0.16
    img += ribs * thorax
    for side in (-1, 1):  # clavicles
        cl = (np.abs(y - (0.24 - 0.08 * (np.abs(x - 0.5) - 0.05))) < 0.012) & (np.abs(x - 0.5) > 0.04)
        cl &= (np.abs(x - 0.5) < 0.30) & (np.sign(x - 0.5) == side)
        img[cl] = 0.80
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "L")
    return pil.filter(ImageFilter.GaussianBlur(2.2)).convert("RGB")


def draw_histology(size: int = 512, seed: int = 1) -> Image.Image:
    """A synthetic H&E-stained tissue section: pink stroma and purple nuclei (drawn by code)."""
    rng = np.random.default_rng(seed)
    base = np.empty((size, size, 3), np.float32)
    base[...] = (236, 176, 204)
    noise = rng.normal(0, 1, (size // 16, size // 16)).astype(np.float32)
    texture = np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC))
    base += texture[..., None] * np.array([6, 14, 10], np.float32)
    pil = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(40):  # fibres
        x0, y0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(60, 180)
        draw.line([(x0, y0), (x0 + length * np.cos(angle), y0 + length * np.sin(angle))],
                  fill=(221, 140, 178), width=int(rng.integers(2, 5)))
    for _ in range(260):  # nuclei
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(4, 9), rng.uniform(3, 7)
        shade = rng.uniform(-20, 20)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry],
                     fill=(int(95 + shade), int(60 + shade), int(150 + shade)))
    return pil.filter(ImageFilter.GaussianBlur(0.8))


def _skimage_file(name: str) -> Path | None:
    """A scikit-image sample shipped inside the installed package (never downloaded)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "data" / name
        if candidate.is_file():
            return candidate
    return None


def _pydicom_file(name: str) -> Path | None:
    """A pydicom test file shipped with the package (never downloaded)."""
    try:
        from pydicom.data import get_testdata_file

        found = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - optional sample; any failure means 'not available'
        return None
    return Path(found) if found and Path(found).is_file() else None


def prepare_examples(folder: str | os.PathLike[str]) -> list[Example]:
    """Example images for the UI, written to ``folder``: real samples found in installed packages (pydicom's CT
    and MR slices; scikit-image's IHC, retina and cell images when scikit-image is installed) and images drawn by
    code. Nothing is downloaded and no third-party file is bundled with this project."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []

    def copy(src: Path, name: str) -> str:
        target = folder / name
        if not target.exists() or target.stat().st_size != src.stat().st_size:
            tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        return str(target)

    def drawn(image: Image.Image, name: str) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        target = folder / name
        if not target.exists() or target.read_bytes() != buf.getvalue():
            tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, target)
        return str(target)

    examples.append(Example(drawn(draw_chest_xray(), "synthetic_chest_xray.png"),
                            "Describe the findings in this chest X-ray.", "drawn by code"))
    for name, question in (("CT_small.dcm", "What imaging modality is this, and which body region does it show?"),
                           ("MR_small.dcm", "What kind of MRI image is this?")):
        src = _pydicom_file(name)
        if src is not None:
            examples.append(Example(copy(src, name), question, "pydicom test data"))
    for name, question in (("ihc.png", "What staining technique was used, and what structures are visible?"),
                           ("retina.jpg", "Describe this fundus photograph. Are there signs of retinopathy?"),
                           ("cell.png", "What does this microscopy image show?")):
        src = _skimage_file(name)
        if src is not None:
            examples.append(Example(copy(src, f"skimage_{name}"), question, "scikit-image sample data"))
    if not any(e.source == "scikit-image sample data" for e in examples):
        examples.append(Example(drawn(draw_histology(), "synthetic_histology.png"),
                                "What staining technique was used, and what structures are visible?",
                                "drawn by code"))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# The UI


@dataclasses.dataclass
class WebConfig:
    """Options of the web UI (see ``--help``)."""

    controller_url: str = DEFAULT_CONTROLLER_URL
    model_list_mode: str = "once"
    log_dir: Path = Path(DEFAULT_LOG_DIR)
    concurrency_count: int = DEFAULT_CONCURRENCY_COUNT
    embed: bool = False
    conv_mode: str | None = None
    max_image_pixels: int = ImageLimits().max_pixels
    max_image_bytes: int = ImageLimits().max_bytes
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    request_timeout: float | None = None
    examples_dir: Path | None = None
    examples: bool = True

    def __post_init__(self) -> None:
        self.controller_url = self.controller_url.rstrip("/")
        self.log_dir = Path(self.log_dir)
        if self.model_list_mode not in ("once", "reload"):
            raise ValueError(f"model_list_mode must be 'once' or 'reload', got {self.model_list_mode!r}")
        if self.concurrency_count < 1:
            raise ValueError(f"concurrency_count must be >= 1, got {self.concurrency_count}")
        if self.conv_mode is not None and self.conv_mode not in template_names():
            raise ValueError(f"unknown conv_mode {self.conv_mode!r}; known: {', '.join(template_names())}")
        if self.max_input_chars < 1:
            raise ValueError(f"max_input_chars must be >= 1, got {self.max_input_chars}")
        if self.request_timeout is None:
            self.request_timeout = worker_api_timeout()
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.examples_dir is None:
            self.examples_dir = self.log_dir / "examples"
        self.examples_dir = Path(self.examples_dir)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


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
        _require_gradio()
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
                              timeout=timeout or self.config.request_timeout)

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

    def conv_mode_for(self, worker_url: str, client: LlavaMedClient) -> str:
        """The template the worker reports (``--conv-mode`` of the web UI overrides it)."""
        if self.config.conv_mode:
            return self.config.conv_mode
        try:
            name = client.conv_template(worker_url)
        except ClientError as exc:  # an older worker without the endpoint, or one that went away
            logger.warning("cannot ask %s for its template (%s); using %s", worker_url, exc, DEFAULT_CONV_MODE)
            return DEFAULT_CONV_MODE
        if name in template_names():
            return name
        if name:
            logger.warning("worker %s reports an unknown template %r; using %s", worker_url, name, DEFAULT_CONV_MODE)
        return DEFAULT_CONV_MODE

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
            render_chat(session),
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
            conv_mode = self.conv_mode_for(address, client)
            turn.conv_mode = conv_mode
            prompt, stop, images = build_prompt(conv_mode, session, turn)
            logger.info("conv %s: %s via %s, template %s, %d image(s)", session.conv_id[:8], model, address,
                        conv_mode, len(images))
            worker = self.client(worker_url=address)
            client.close()
            client = worker
            stream = client.generate_stream(
                model, prompt, images,
                temperature=params["temperature"], top_p=max(params["top_p"], 0.01),
                max_new_tokens=max(params["max_new_tokens"], 1), stop=stop, echo=False,
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
                        temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature",
                                                elem_id="llava-med-temperature")
                        top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top P", elem_id="llava-med-top-p")
                        max_tokens = gr.Slider(8, 1024, value=512, step=8, label="Max output tokens",
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


# ---------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_med.serve.gradio_web_server",
                                description="LLaVA-Med web chat (Gradio) over a controller and its workers.")
    p.add_argument("--host", type=str, default=DEFAULT_HOST, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_WEB_PORT, help="default %(default)s")
    p.add_argument("--controller-url", type=str, default=DEFAULT_CONTROLLER_URL, help="default %(default)s")
    p.add_argument("--concurrency-count", type=int, default=DEFAULT_CONCURRENCY_COUNT,
                   help="answers generated at once; more wait in the page's queue (default %(default)s)")
    p.add_argument("--model-list-mode", type=str, default="once", choices=["once", "reload"],
                   help="once: ask the controller for models at start; reload: at each page load")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    p.add_argument("--moderate", action="store_true", help="accepted for compatibility; no moderation is done")
    p.add_argument("--embed", action="store_true", help="compact page for embedding (no title)")
    p.add_argument("--log-dir", type=str, default=DEFAULT_LOG_DIR,
                   help="folder of the conversation/vote logs and saved images (default %(default)s)")
    p.add_argument("--conv-mode", type=str, default=None, choices=template_names(),
                   help="prompt template for every model (default: the one each worker reports)")
    p.add_argument("--max-image-pixels", type=int, default=ImageLimits().max_pixels,
                   help="largest uploaded image, in pixels (default %(default)s)")
    p.add_argument("--max-image-bytes", type=int, default=ImageLimits().max_bytes,
                   help="largest uploaded file, in bytes (default %(default)s)")
    p.add_argument("--max-input-chars", type=int, default=DEFAULT_MAX_INPUT_CHARS,
                   help="longest question accepted (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds to wait for the next token (default: env LLAVA_MED_WORKER_API_TIMEOUT or 100)")
    p.add_argument("--no-examples", action="store_true", help="do not show example images")
    p.add_argument("--log-level", type=str, default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency_count < 1:
        parser.error("--concurrency-count must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from llava_med.serve import _http

    args = parse_args(argv)
    _http.configure_logging(args.log_level)
    _require_gradio()
    if args.moderate:
        logger.warning("--moderate is accepted for compatibility but does nothing: no moderation service is used")
    logger.info("args: %s", vars(args))
    ui = WebUI(WebConfig(
        controller_url=args.controller_url, model_list_mode=args.model_list_mode, log_dir=Path(args.log_dir),
        concurrency_count=args.concurrency_count, embed=args.embed, conv_mode=args.conv_mode,
        max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
        max_input_chars=args.max_input_chars, request_timeout=args.request_timeout, examples=not args.no_examples,
    ))
    if args.share:
        # A share link needs Gradio's own server; /health is added to its app.
        _, local_url, share_url = ui.demo.launch(server_name=args.host, server_port=args.port, share=True,
                                                 prevent_thread_lock=True, show_error=True, **ui.mount_options())
        ui.demo.app.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"])
        logger.info("web UI at %s (public link %s)", local_url, share_url)
        ui.demo.block_thread()
        return
    app = create_app(ui, host=args.host, port=args.port)
    server = _http.build_server(app, args.host, args.port, args.log_level)
    # Open pages keep a heartbeat stream; do not wait long for it when stopping.
    server.config.timeout_graceful_shutdown = WEB_GRACEFUL_SHUTDOWN
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # every streamed file and poll otherwise
    logger.info("web UI at %s (controller %s)", _http.advertised_url(args.host, args.port), args.controller_url)
    server.run()


if __name__ == "__main__":
    main()
