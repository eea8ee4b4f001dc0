"""The web chat (Gradio), split by concern: ``config`` (options and constants), ``session`` (per-tab chat state,
uploads, prompts), ``messages`` (what the chat shows, errors in plain words), ``chat_log`` (JSON-lines logs and
images saved by hash), ``examples`` (example images) and ``ui`` (the page, its handlers and its FastAPI app).
``llava_med.serve.gradio_web_server`` is the entry point."""
