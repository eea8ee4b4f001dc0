"""The web chat (Gradio), split by concern: ``config`` (options and constants), ``session`` (per-tab chat state and
prompts), ``upload`` (the image panel: uploads, DICOM windows and slices), ``messages`` (what the chat shows, problems
in plain words), ``handlers`` (what the page does), ``export`` (Markdown and JSON downloads), ``chat_log`` (JSON-lines
logs and images saved by hash), ``examples`` (example images), ``assets`` (the page's CSS and script) and ``ui`` (the
page's layout and its FastAPI app). ``llava_med.serve.gradio_web_server`` is the entry point."""
