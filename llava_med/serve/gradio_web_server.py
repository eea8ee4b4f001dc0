"""The web chat (Gradio 6): pick a model, upload an image (PNG, JPEG, DICOM, ...), ask, stream the answer.

Run: ``python -m llava_med.serve.gradio_web_server --controller-url http://localhost:21001`` (or ``llava-med web``),
then open http://127.0.0.1:7860. ``llava-med launch`` starts it together with a controller and workers.

How it works:

* The model list comes from the controller (``--model-list-mode once``: at start; ``reload``: at each page load;
  the refresh button asks again at any time). When the controller cannot be reached, or has no worker, a banner
  says so, with the URL it tried and a Retry button.
* The image panel shows the image as the model will see it and takes a new file (dropped, pasted or chosen) at any
  time. DICOM files get their tags (modality, body part, series, slice position; never patient data), window
  presets for CT (soft tissue, lung, bone, brain, stored, auto) and, for multi-frame files and series (several
  files or a ``.zip``), a slice slider. The uploaded bytes stay in memory; Gradio's copy is deleted once read.
* Each answer goes through :class:`llava_med.serve.client.LlavaMedClient`: the controller names a worker
  (``/get_worker_address``), the worker names its prompt template (``/worker_get_conv_template``), the prompt is
  built with that template from the chat history, and the answer is streamed from the worker. The image travels as
  base64 PNG with the chosen ``image_process_mode`` (Crop, Resize, Pad, Default), and for DICOM the ``dicom_window``
  and ``dicom_frame`` it was rendered with.
* **Stop** cancels the Gradio event; the generator then closes its HTTP stream, and the worker cancels the request
  at once (its queue length drops back). A stop flag on the session stops the stream too, so the worker is freed
  even if the cancellation arrives between two chunks.
* Every problem is shown once, in plain words, where the user looks: upload problems in the image panel, answer
  problems (no worker for the model, a refused request, a broken connection) in the chat, a question over the
  limit by the question box's counter; library texts and tracebacks go to the server's log only.
* Every finished answer (done, stopped or failed) and every vote/flag is appended as one JSON line to
  ``<log-dir>/<date>-conv.jsonl``; the images sent to the model are saved once, by content hash and without
  metadata, as ``<log-dir>/images/<sha256>.png``. The page exports the conversation as Markdown and JSON.

This module is the entry point (the original's spelling); the page lives in :mod:`llava_med.serve.web`: ``config``
(options), ``session`` (chat state, prompts), ``upload`` (the image panel), ``messages`` (what the chat shows),
``handlers`` (what the page does), ``export``, ``chat_log`` (logs), ``examples``, ``assets`` (CSS and script) and
``ui`` (the Gradio page and its FastAPI app).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from llava_med.constants import DEFAULT_CONTROLLER_URL, DEFAULT_HOST, DEFAULT_WEB_PORT
from llava_med.conversation import template_names
from llava_med.images.decode import ImageLimits
from llava_med.serve.web.config import (
    DEFAULT_CONCURRENCY_COUNT,
    DEFAULT_LOG_DIR,
    DEFAULT_MAX_INPUT_CHARS,
    DEFAULT_MAX_SERIES_BYTES,
    DEFAULT_MAX_SERIES_FILES,
    WEB_GRACEFUL_SHUTDOWN,
    WebConfig,
)

__all__ = ["build_parser", "main", "parse_args"]

logger = logging.getLogger(__name__)


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
                   help="longest question accepted; the question box counts characters near it (default %(default)s)")
    p.add_argument("--max-series-files", type=int, default=DEFAULT_MAX_SERIES_FILES,
                   help="most files in a DICOM series upload (several files or a .zip; default %(default)s)")
    p.add_argument("--max-series-bytes", type=int, default=DEFAULT_MAX_SERIES_BYTES,
                   help="most bytes of a DICOM series upload, uncompressed, in all (default %(default)s)")
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
    from llava_med.serve.web.ui import WebUI, create_app, require_gradio

    args = parse_args(argv)
    _http.configure_logging(args.log_level)
    require_gradio()
    if args.moderate:
        logger.warning("--moderate is accepted for compatibility but does nothing: no moderation service is used")
    logger.info("args: %s", vars(args))
    ui = WebUI(WebConfig(
        controller_url=args.controller_url, model_list_mode=args.model_list_mode, log_dir=Path(args.log_dir),
        concurrency_count=args.concurrency_count, embed=args.embed, conv_mode=args.conv_mode,
        max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
        max_input_chars=args.max_input_chars, max_series_files=args.max_series_files,
        max_series_bytes=args.max_series_bytes, request_timeout=args.request_timeout, examples=not args.no_examples,
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
