"""Options and constants of the web chat (see ``llava-med web --help``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llava_med.constants import DEFAULT_CONTROLLER_URL, worker_api_timeout
from llava_med.conversation import template_names
from llava_med.images.decode import ImageLimits
from llava_med.images.series import SeriesLimits

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
SUPPORTED_IMAGES_TEXT = "PNG, JPEG, TIFF, WebP, BMP, GIF or DICOM (one file, several slices or a .zip series)"
UPLOAD_FILE_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".dcm", ".dicom", ".zip"]
#: A DICOM series uploaded as several files or a .zip: at most this many files and bytes (uncompressed), in all.
DEFAULT_MAX_SERIES_FILES = SeriesLimits().max_files
DEFAULT_MAX_SERIES_BYTES = SeriesLimits().max_total_bytes
#: The question box shows a character counter from this share of --max-input-chars on.
COUNTER_FROM = 0.8

TURN_STREAMING = "streaming"
TURN_DONE = "done"
TURN_STOPPED = "stopped"
TURN_ERROR = "error"


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
    max_series_files: int = DEFAULT_MAX_SERIES_FILES
    max_series_bytes: int = DEFAULT_MAX_SERIES_BYTES
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
        if self.max_series_files < 1 or self.max_series_bytes < 1:
            raise ValueError("max_series_files and max_series_bytes must be >= 1")
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

    @property
    def series_limits(self) -> SeriesLimits:
        return SeriesLimits(max_files=self.max_series_files, max_total_bytes=self.max_series_bytes)

