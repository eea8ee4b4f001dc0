"""Append-only JSON-lines log of chats and votes, and images saved once by content hash."""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_med.serve.web.session import ChatSession, Turn

def write_atomic(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (a temp file renamed into place): readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def save_once(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` unless it exists (files named by their content's hash never change)."""
    return target if target.exists() else write_atomic(target, data)


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

    def log_chat(self, session: ChatSession, turn: Turn, *, ip: str | None) -> None:
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
            "params": turn.params,
            "images": [session.image.sha256] if session.image is not None else [],
            "image_details": session.image.details if session.image is not None else None,
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

