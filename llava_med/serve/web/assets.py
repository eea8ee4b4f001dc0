"""The page's own CSS and script (passed to Gradio as ``css`` and ``head``; Gradio scopes ``css`` to the page's
content, so the few rules about the page around it are in ``head``).

The script does what Gradio components cannot: a file dropped anywhere on the page (or pasted) goes to the image
panel's upload, and the question box shows a character counter near the limit and refuses to send above it.
"""

from __future__ import annotations

import json

__all__ = ["CSS", "head_script"]

CSS = """
.gradio-container {max-width: 1500px !important;}
#llava-med-header {align-items: center; gap: 12px; flex-wrap: nowrap;}
#llava-med-title h1 {font-size: 1.35rem; margin: 0; white-space: nowrap;}
#llava-med-title p {margin: 0; opacity: 0.75; font-size: 0.9rem;}
#llava-med-model-row {gap: 6px; align-items: center; flex-wrap: nowrap; max-width: 460px;}
#llava-med-model-label {flex: 0 0 auto !important; min-width: 0 !important; width: auto !important;}
#llava-med-model-label p {margin: 0; font-weight: 600; font-size: 0.9rem;}
#llava-med-model-row > * {min-width: 0;}
#llava-med-refresh {align-self: stretch; min-height: 42px; max-width: 48px; font-size: 1.1rem;}
#llava-med-notice {font-size: 0.85rem; border-left: 3px solid #d97706; padding: 4px 10px;
  background: rgba(217, 119, 6, 0.08); border-radius: 4px;}
#llava-med-notice p {margin: 0;}
#llava-med-banner {border: 1px solid #dc2626; background: rgba(220, 38, 38, 0.08); border-radius: 8px;
  padding: 8px 12px; align-items: center; gap: 12px;}
#llava-med-banner p {margin: 0;}
#llava-med-banner-retry {max-width: 120px;}

/* The image panel: one card; the drop zone is tall when empty, a slim bar once an image is shown. */
#llava-med-image-panel {border: 1px solid var(--border-color-primary); border-radius: 12px; padding: 10px;
  gap: 8px; background: var(--block-background-fill); transition: box-shadow 0.15s;}
#llava-med-image-panel.llava-med-dragging {box-shadow: 0 0 0 3px var(--color-accent);}
#llava-med-preview {border: none !important; box-shadow: none; padding: 0; background: #000; border-radius: 8px;
  overflow: hidden;}
#llava-med-preview .image-container, #llava-med-preview .image-frame, #llava-med-preview button {background: #000;}
#llava-med-preview img {object-fit: contain; border: none;}
#llava-med-upload {min-height: 0; border-radius: 10px;}
#llava-med-upload .wrap {font-size: 0; gap: 2px;}
#llava-med-upload .wrap .or {display: none;}
#llava-med-upload .wrap::after {content: "Drop or paste an image here, or click to choose one"; font-size: 1rem;
  font-weight: 600;}
#llava-med-upload .wrap::before {content: "PNG, JPEG, TIFF, WebP, DICOM, or a DICOM series (several files or a .zip)";
  order: 3; font-size: 0.8rem; opacity: 0.7; font-weight: 400;}
#llava-med-upload .icon-wrap {order: 0;}
#llava-med-upload .wrap::after {order: 1;}
#llava-med-upload.llava-med-drop-slim .upload-container {height: 52px !important;}
#llava-med-upload.llava-med-drop-slim .wrap::after {content: "Drop, paste or click to replace the image";
  font-size: 0.85rem; font-weight: 500;}
#llava-med-upload.llava-med-drop-slim .wrap::before, #llava-med-upload.llava-med-drop-slim .icon-wrap {display: none;}
#llava-med-upload-status p {margin: 0; font-size: 0.85rem;}
#llava-med-upload-status .llava-med-problem {color: #b91c1c; font-weight: 600;}
.dark #llava-med-upload-status .llava-med-problem {color: #fca5a5;}
#llava-med-dicom-info .llava-med-tags {display: flex; flex-wrap: wrap; gap: 4px 6px; font-size: 0.8rem;}
#llava-med-dicom-info .llava-med-tag {background: var(--background-fill-secondary); border-radius: 6px;
  padding: 2px 8px; border: 1px solid var(--border-color-primary);}
#llava-med-dicom-info .llava-med-tag b {font-weight: 500; opacity: 0.65; margin-right: 4px;}
#llava-med-window .wrap, #llava-med-image-mode .wrap {gap: 4px;}
#llava-med-window label, #llava-med-image-mode label {padding: 4px 10px; font-size: 0.85rem;}

/* The conversation: the main, tall area. */
#llava-med-chat {flex-grow: 1;}
#llava-med-chat .user-row .image-frame img {max-height: 160px; max-width: 220px; width: auto; border-radius: 8px;}
#llava-med-chat .user-row .image-container {max-width: 240px;}
#llava-med-chat button[aria-label="Share"] {display: none;}
#llava-med-counter-box {min-height: 0 !important; margin-top: -6px;}
#llava-med-counter-box:has(#llava-med-counter:empty) {display: none;}
#llava-med-counter {font-size: 0.8rem; opacity: 0.75; text-align: right; font-variant-numeric: tabular-nums;
  min-height: 0;}
#llava-med-counter:empty {display: none;}
#llava-med-counter.over {color: #dc2626; opacity: 1; font-weight: 600;}
.dark #llava-med-counter.over {color: #fca5a5;}
#llava-med-send, #llava-med-stop {align-self: stretch; min-height: 44px; max-height: 120px;}
#llava-med-send.llava-med-blocked {opacity: 0.45; cursor: not-allowed;}
#llava-med-actions {gap: 6px; align-items: center; flex-wrap: wrap;}
#llava-med-actions button {flex: 0 1 auto; min-width: 0;}
#llava-med-feedback {min-height: 1.2em; font-size: 0.85rem; color: var(--color-accent);}
#llava-med-feedback p {margin: 0;}

/* Examples: thumbnails with their question. */
#llava-med-examples {gap: 10px; flex-wrap: wrap;}
.llava-med-example {flex: 1 1 160px !important; max-width: 230px; min-width: 140px !important; display: flex;
  flex-direction: column !important; align-items: stretch !important; justify-content: flex-start !important;
  gap: 6px; padding: 8px !important; height: auto !important; white-space: normal !important;
  text-align: left !important; font-weight: 400 !important; font-size: 0.85rem !important; line-height: 1.3;}
.llava-med-example img {width: 100% !important; height: 110px !important; max-height: none !important;
  object-fit: cover; border-radius: 6px; margin: 0 !important;}
.llava-med-footer {font-size: 0.8rem; opacity: 0.75;}
#llava-med-examples-title h4 {margin: 4px 0 0;}
#llava-med-examples-title p {margin: 0; font-size: 0.8rem; opacity: 0.7;}

/* Narrow screens: the conversation first, the image panel and the controls below it. */
@media (max-width: 820px) {
  #llava-med-main {flex-direction: column;}
  #llava-med-main > .column {min-width: 0 !important; width: 100%;}
  #llava-med-chat-column {order: -1;}
  #llava-med-notice, #llava-med-notice p {font-size: 0.75rem !important; line-height: 1.35;}
  .llava-med-example {flex: 1 1 calc(50% - 10px) !important; max-width: calc(50% - 5px); min-width: 0 !important;}
  .llava-med-example img {height: 90px !important;}
  #llava-med-chat {height: 62vh !important;}
  #llava-med-header {flex-wrap: wrap;}
  #llava-med-model-row {max-width: none; width: 100%;}
}
"""

_SCRIPT = """
<style>
/* Gradio scopes the page's CSS inside its content; the page margins around it are set here. */
@media (max-width: 820px) {
  .gradio-container .main.app {padding-left: 10px; padding-right: 10px;}
}
</style>
<script>
(() => {
  const LIMIT = __LIMIT__, SHOW_FROM = __SHOW_FROM__;
  const fmt = (n) => n.toLocaleString("en-US");
  const panel = () => document.getElementById("llava-med-image-panel");
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");

  // Files dropped (or pasted) anywhere go to the image panel's upload input, as if chosen there.
  function forward(files) {
    const input = document.querySelector("#llava-med-upload input[type=file]");
    if (!input || !files || !files.length) return false;
    const dt = new DataTransfer();
    for (const f of files) dt.items.add(f);
    input.files = dt.files;
    input.dispatchEvent(new Event("change", {bubbles: true}));
    return true;
  }
  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    dragDepth++;
    panel()?.classList.add("llava-med-dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) panel()?.classList.remove("llava-med-dragging");
  });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    dragDepth = 0;
    panel()?.classList.remove("llava-med-dragging");
    if (!hasFiles(e)) return;
    e.preventDefault();
    forward(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData?.files || []);
    if (!files.length) return;
    if (!e.clipboardData.getData("text/plain")) e.preventDefault();
    forward(files);
  });

  // The question box: a counter near the limit; above it, Enter and Send do nothing and the counter says why.
  const textarea = () => document.querySelector("#llava-med-input textarea");
  const tooLong = () => (textarea()?.value.length || 0) > LIMIT;
  function updateCounter() {
    const counter = document.getElementById("llava-med-counter"), area = textarea();
    if (!counter || !area) return;
    const n = area.value.length;
    let text = "";
    if (n > LIMIT) {
      text = `${fmt(n)} / ${fmt(LIMIT)} characters: shorten the question by ${fmt(n - LIMIT)} to send it`;
    } else if (n >= SHOW_FROM) {
      text = `${fmt(n)} / ${fmt(LIMIT)}`;
    }
    if (counter.textContent !== text) counter.textContent = text;
    counter.classList.toggle("over", n > LIMIT);
    document.getElementById("llava-med-send")?.classList.toggle("llava-med-blocked", n > LIMIT);
  }
  document.addEventListener("input", (e) => {
    if (e.target?.closest && e.target.closest("#llava-med-input")) updateCounter();
  });
  setInterval(updateCounter, 400);  // the page also sets the box's text (examples, after sending)
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && e.target?.closest && e.target.closest("#llava-med-input")
        && tooLong()) {
      e.preventDefault();
      e.stopImmediatePropagation();
      updateCounter();
    }
  }, true);
  document.addEventListener("click", (e) => {
    if (e.target?.closest && e.target.closest("#llava-med-send") && tooLong()) {
      e.preventDefault();
      e.stopImmediatePropagation();
      updateCounter();
    }
  }, true);
})();
</script>
"""


def head_script(max_input_chars: int, show_from: int) -> str:
    """The ``<script>`` for the page's ``head`` (limits of the question box filled in)."""
    return _SCRIPT.replace("__LIMIT__", json.dumps(int(max_input_chars))).replace(
        "__SHOW_FROM__", json.dumps(int(show_from)))
