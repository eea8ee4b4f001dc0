"""The conversation as files the user downloads from the page: Markdown with the image embedded (one file that any
Markdown viewer shows), and JSON with the same content for scripts. Neither holds file names or DICOM tags other
than the ones the page shows."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from llava_med.constants import RESEARCH_ONLY_NOTICE
from llava_med.serve.web.chat_log import write_atomic
from llava_med.serve.web.config import TURN_ERROR, TURN_STOPPED
from llava_med.serve.web.session import ChatSession

__all__ = ["conversation_json", "conversation_markdown", "write_exports"]


def conversation_json(session: ChatSession) -> dict[str, Any]:
    """The conversation as a JSON-able dict: model, template and parameters of each answer, the image (PNG as
    base64, its hash and the rendering of DICOM images) and the messages."""
    image = None
    if session.image is not None:
        image = {**session.image.details, "sha256": session.image.sha256, "width": session.image.width,
                 "height": session.image.height, "png_base64": session.image.b64}
    return {
        "conversation_id": session.conv_id,
        "exported_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "image": image,
        "image_process_mode": session.image_process_mode,
        "turns": [{"question": t.user, "answer": t.answer, "status": t.status, "error": t.error, "model": t.model,
                   "conv_mode": t.conv_mode, "params": t.params} for t in session.turns],
        "notice": RESEARCH_ONLY_NOTICE,
    }


def conversation_markdown(data: dict[str, Any]) -> str:
    """The conversation (:func:`conversation_json`) as Markdown, the image embedded as a data URL."""
    lines = ["# LLaVA-Med conversation", "", f"*Exported {data['exported_at']}. {RESEARCH_ONLY_NOTICE}*", ""]
    image = data["image"]
    if image is not None:
        about = [f"{image['width']}×{image['height']} PNG as sent to the model",
                 f"preprocessing {data['image_process_mode']}"]
        dicom = image.get("dicom") or {}
        about += [f"{key.replace('_', ' ')} {value}" for key, value in dicom.items() if value not in (None, "", 1)]
        lines += [f"![The image asked about](data:image/png;base64,{image['png_base64']})", "",
                  f"*Image: {'; '.join(about)}.*", ""]
    for turn in data["turns"]:
        lines += [f"**You:** {turn['question']}", ""]
        if turn["status"] == TURN_ERROR:
            answer = f"*(no answer: {turn['error']})*"
        else:
            answer = turn["answer"] + (" *(stopped)*" if turn["status"] == TURN_STOPPED else "")
        source = f" ({turn['model']})" if turn["model"] else ""
        lines += [f"**LLaVA-Med{source}:** {answer}", ""]
    return "\n".join(lines)


def write_exports(session: ChatSession, folder: str | os.PathLike[str]) -> tuple[str, str]:
    """Write the Markdown and JSON exports of ``session`` into ``folder``; returns their paths."""
    folder = Path(folder) / session.conv_id
    stem = f"llava-med-conversation-{session.conv_id[:8]}"
    data = conversation_json(session)  # one export time for both files
    markdown = write_atomic(folder / f"{stem}.md", conversation_markdown(data).encode("utf-8"))
    payload = json.dumps(data, ensure_ascii=False, indent=2)
    as_json = write_atomic(folder / f"{stem}.json", payload.encode("utf-8"))
    return str(markdown), str(as_json)
