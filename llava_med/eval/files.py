"""Reading question / ground-truth files and writing resumable results files (the evaluation commands share them).

* :func:`iter_jsonl` reads a JSON-lines file line by line; a bad line is reported with its number, never fatal.
* :func:`load_records` reads a JSON list or a JSON-lines file (the formats data sets are distributed in).
* :class:`ResultsFile` is an append-only JSON-lines file that a run can be stopped and restarted on: each record is
  written whole and flushed as it arrives, a record cut short by a kill is dropped on reopening, and the keys
  already written are known, so a restart does only what is missing.
* :func:`run_bounded` runs the missing items, a bounded number at once, appending each record as it completes.

Question ids are compared as strings (``question_id`` 7 and ``"7"`` are the same question), so a ground truth file
written by one tool joins the answers written by another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["EvalInputError", "Line", "ResultsFile", "get_chunk", "id_key", "iter_jsonl", "load_records",
           "run_bounded"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EvalInputError(ValueError):
    """An input file is missing or cannot be read as a whole (the message names the file and the line)."""


def id_key(question_id: Any) -> str:
    """The key a question id is joined on: its string form (``7`` and ``"7"`` are one question)."""
    return question_id if isinstance(question_id, str) else json.dumps(question_id)


@dataclass(frozen=True)
class Line:
    """One non-blank line of a JSON-lines file: the parsed object, or why it is not one."""

    lineno: int
    record: dict[str, Any] | None
    error: str | None = None


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[Line]:
    """The non-blank lines of a JSON-lines file, each parsed into a dict or carrying an error that names the line."""
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise EvalInputError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from exc
    with fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Line(lineno, None, f"line {lineno} is not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                yield Line(lineno, None, f"line {lineno} is a JSON {type(record).__name__}, not an object")
                continue
            yield Line(lineno, record)


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a JSON list (``[{...}, ...]``) or JSON-lines file; :class:`EvalInputError` on any bad record."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(4096).lstrip()
    except OSError as exc:
        raise EvalInputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if head.startswith("["):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{name} is not valid JSON: {exc}") from exc
        bad = [i for i, item in enumerate(data) if not isinstance(item, dict)]
        if bad:
            raise EvalInputError(f"{name}: item {bad[0]} of the list is not a JSON object")
        return data
    records = []
    for line in iter_jsonl(path):
        if line.record is None:
            raise EvalInputError(f"{name}: {line.error}")
        records.append(line.record)
    return records


def get_chunk(items: Sequence[T], num_chunks: int, chunk_idx: int) -> list[T]:
    """Chunk ``chunk_idx`` of ``num_chunks`` (the original's split: ceil-sized consecutive chunks)."""
    if num_chunks < 1:
        raise ValueError(f"--num-chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, {num_chunks - 1}], got {chunk_idx}")
    size = max(1, math.ceil(len(items) / num_chunks))
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


class ResultsFile:
    """An append-only JSON-lines results file that survives being killed at any moment.

    ``key(record)`` names what a record answers (a question id); :meth:`open` reads what is already there (dropping a
    last line cut short by a kill, and, when ``drop(record)`` says so, records to redo, e.g. failed ones) so the
    caller skips those keys; :meth:`append` writes one record in one ``write`` and flushes it.
    """

    def __init__(self, path: str | os.PathLike[str], key: Callable[[dict[str, Any]], str | None]) -> None:
        self.path = Path(path)
        self.key = key
        self.done: dict[str, dict[str, Any]] = {}
        self._fh: Any = None

    def open(self, drop: Callable[[dict[str, Any]], bool] | None = None) -> ResultsFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        rewrite = False
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # The last record was being written when the run was killed: it never completed, redo it.
                cut = data.rfind(b"\n") + 1
                logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                               self.path, len(data) - cut)
                data = data[:cut]
                rewrite = True
            for lineno, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    logger.warning("%s: line %d is not valid JSON; it is kept but does not count as done",
                                   self.path, lineno)
                    kept.append(raw)
                    continue
                if drop is not None and isinstance(record, dict) and drop(record):
                    rewrite = True
                    continue
                kept.append(raw)
                key = self.key(record) if isinstance(record, dict) else None
                if key is not None:
                    self.done[key] = record
        if rewrite:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        return self

    def append(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise RuntimeError("ResultsFile.open() first")
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        key = self.key(record)
        if key is not None:
            self.done[key] = record

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def run_bounded(items: Sequence[T], work: Callable[[T], Awaitable[dict[str, Any]]], results: ResultsFile, *,
                      concurrency: int, on_record: Callable[[T, dict[str, Any]], dict[str, int]], total: int,
                      initial: int, unit: str, desc: str, no_progress: bool) -> None:
    """``work(item)`` for every item, at most ``concurrency`` at once; each record is appended to ``results`` as it
    completes and handed to ``on_record``, which counts it and returns the figures shown beside the progress bar
    (``total`` items in all, ``initial`` of them done before this run)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, disable=no_progress,
               file=sys.stderr)

    async def one(item: T) -> None:
        async with semaphore:
            record = await work(item)
        results.append(record)
        figures = on_record(item, record)
        bar.update(1)
        bar.set_postfix(**figures, refresh=False)

    try:
        with logging_redirect_tqdm():
            await asyncio.gather(*(one(item) for item in items))
    finally:
        bar.close()
