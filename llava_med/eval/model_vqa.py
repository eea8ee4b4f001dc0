"""Answer a question file with LLaVA-Med: batched on this machine, or spread over every worker of a serving stack.

    llava-med eval model_vqa --question-file q.jsonl --image-folder images/ --answers-file answers.jsonl \\
        [--model-path microsoft/llava-med-v1.5-mistral-7b] [--batch-size 8]            # locally, batched
    llava-med eval model_vqa --question-file q.jsonl --image-folder images/ --answers-file answers.jsonl \\
        --controller-url http://localhost:21001 --model llava-med-v1.5-mistral-7b --concurrency 16  # the stack

Questions are JSON lines ``{question_id, image, text}`` (``image`` relative to ``--image-folder``; a question
without ``image`` is asked as text only); answers are written in the original format
``{question_id, prompt, text, answer_id, model_id, metadata}``. The prompt is rendered with
:func:`llava_med.chat.render_chat` in both modes (``<image>`` in front of the question, the checkpoint's template),
so a question gets the same prompt locally and on a worker, and greedy answers are identical.

* Locally the questions go through the transformers engine the worker uses (:class:`~llava_med.engine.hf.HFEngine`,
  continuous batching, ``--batch-size`` rows at once).
* With ``--controller-url`` each question asks the controller for a worker (``/get_worker_address``), so every
  worker serving ``--model`` shares the load; ``--concurrency`` questions are in flight at once.

Resumable: ids already in the answers file are skipped and every answer is appended and flushed as it arrives
(a record cut short by a kill is dropped and redone). A bad question line, a missing or undecodable image or a
worker error becomes that answer's ``metadata.error`` (and ``metadata.error_code``), is counted, and the run goes on;
``--retry-errors`` redoes those on the next run. Differences from the original script: temperature 0 (greedy) by
default instead of 0.2, ``--num_beams`` other than 1 is refused, sampled runs are seeded per question (``--seed``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import signal
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_med.chat import Message, render_chat, resolve_conv_mode
from llava_med.constants import DEFAULT_IMAGE_TOKEN, RESEARCH_ONLY_NOTICE, ErrorCode
from llava_med.errors import LlavaMedError
from llava_med.eval.files import EvalInputError, ResultsFile, get_chunk, id_key, iter_jsonl, run_bounded
from llava_med.model.args import add_model_args, load_config_from_args
from llava_med.sampling import SamplingParams

__all__ = ["EvalSetupError", "Question", "RunSummary", "build_parser", "main", "read_questions", "run"]

logger = logging.getLogger(__name__)

#: Errors of the stack worth asking again (another worker may answer, a busy one may have room).
RETRYABLE_CODES = {ErrorCode.ENGINE_OVERLOADED, ErrorCode.WORKER_UNREACHABLE, ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                   ErrorCode.CONTROLLER_NO_WORKER}
RETRY_DELAY = 1.0


class EvalSetupError(RuntimeError):
    """The run cannot start (controller unreachable, model not served)."""


# ---------------------------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    """One line of the question file; ``error`` says why it cannot be asked (it is then answered with that error)."""

    lineno: int
    question_id: Any = None
    text: str = ""
    image: str | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        """What the answer is filed under: the question id, or the line number of a line without one."""
        return id_key(self.question_id) if self.question_id is not None else f"#line {self.lineno}"

    @property
    def prompt_text(self) -> str:
        """The question as the original wrote it to the answers file: without ``<image>``, stripped."""
        return self.text.replace(DEFAULT_IMAGE_TOKEN, "").strip()


def answer_key(record: dict[str, Any]) -> str | None:
    """The key of an answers-file record (see :attr:`Question.key`)."""
    if record.get("question_id") is not None:
        return id_key(record["question_id"])
    line = (record.get("metadata") or {}).get("line")
    return f"#line {line}" if line is not None else None


def read_questions(path: str | os.PathLike[str]) -> tuple[list[Question], int]:
    """The questions of a file, bad lines included (as questions carrying an error), and the number of duplicate
    ids left out (a question id is asked once)."""
    questions: list[Question] = []
    seen: set[str] = set()
    duplicates = 0
    for line in iter_jsonl(path):
        if line.record is None:
            questions.append(Question(line.lineno, error=f"bad question line: {line.error}"))
            continue
        rec = line.record
        qid = rec.get("question_id")
        if qid is None or isinstance(qid, (dict, list, bool)):
            questions.append(Question(line.lineno, error=f"bad question line {line.lineno}: no usable question_id"))
            continue
        if id_key(qid) in seen:
            duplicates += 1
            logger.warning("line %d repeats question_id %r: left out", line.lineno, qid)
            continue
        seen.add(id_key(qid))
        text, image = rec.get("text"), rec.get("image")
        if not isinstance(text, str) or not text.replace(DEFAULT_IMAGE_TOKEN, "").strip():
            questions.append(Question(line.lineno, qid, error=f"bad question line {line.lineno}: 'text' must be a "
                                                              f"non-empty string"))
        elif image is not None and (not isinstance(image, str) or not image):
            questions.append(Question(line.lineno, qid, text, error=f"bad question line {line.lineno}: 'image' must "
                                                                    f"be a file name"))
        else:
            questions.append(Question(line.lineno, qid, text, image))
    return questions, duplicates


def read_image_b64(question: Question, image_folder: str) -> str:
    """The question's image file as base64 (decoded by the engine, like any image a worker receives)."""
    assert question.image is not None
    path = Path(image_folder) / question.image if image_folder else Path(question.image)
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise LlavaMedError(f"cannot read image {os.fspath(path)}: {exc.strerror or exc}",
                            code=ErrorCode.BAD_IMAGE) from exc


def question_seed(seed: int, question: Question) -> int:
    """A per-question seed, so a sampled answer does not depend on the order or batch it ran in."""
    return zlib.crc32(f"{seed}:{question.key}".encode())


# ---------------------------------------------------------------------------------------------------------- backends
class LocalBackend:
    """The worker's engine, in this process (batched)."""

    def __init__(self, args: argparse.Namespace, loaded: Any = None) -> None:
        from llava_med.engine.hf import BatchingConfig, HFEngine

        batching = BatchingConfig(max_batch_size=args.batch_size, max_queue=max(2 * args.batch_size, 16),
                                  stream_min_interval=3600.0)  # only the final text is used
        self.engine = HFEngine(load_config_from_args(args), batching=batching, loaded=loaded)
        # Keep the queue full, so a new row joins the batch as soon as one finishes.
        self.concurrency = 2 * args.batch_size
        self.conv_mode = ""
        self.model_id = ""

    async def start(self) -> None:
        await self.engine.start()
        self.conv_mode = resolve_conv_mode(self.engine.conv_mode, None)
        self.model_id = self.engine.model_names[0]

    async def answer(self, prompt: str, images: Sequence[str], params: SamplingParams) -> str:
        from llava_med.engine.base import EngineRequest

        final = None
        async for output in self.engine.generate_stream(EngineRequest(prompt, tuple(images), params)):
            final = output
        return final.text if final is not None else ""

    async def close(self) -> None:
        await self.engine.shutdown()


class StackBackend:
    """Questions through a controller: each asks for a worker of ``model`` (the controller spreads them)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.controller_url = args.controller_url
        self.model_id = args.model
        self.explicit_conv_mode = args.conv_mode
        self.timeout = args.request_timeout
        self.retries = args.retries
        self.concurrency = args.concurrency
        self.conv_mode = ""
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="model-vqa")

    def _client(self) -> Any:
        from llava_med.serve.client import LlavaMedClient

        client = getattr(self._local, "client", None)
        if client is None:  # one HTTP session per thread
            client = self._local.client = LlavaMedClient(self.controller_url, timeout=self.timeout)
            with self._lock:
                self._clients.append(client)
        return client

    async def start(self) -> None:
        from llava_med.serve.client import ClientError

        def probe() -> str:
            client = self._client()
            try:
                models = client.list_models()
            except ClientError as exc:
                raise EvalSetupError(f"cannot reach the controller {self.controller_url}: {exc}") from exc
            if self.model_id not in models:
                raise EvalSetupError(f"no worker serves {self.model_id!r}; the controller lists: "
                                     f"{', '.join(models) or 'no model'}")
            return client.conv_mode_for(client.get_worker_address(self.model_id), self.explicit_conv_mode)

        self.conv_mode = await asyncio.get_running_loop().run_in_executor(self._pool, probe)

    def _generate(self, prompt: str, images: Sequence[str], params: SamplingParams) -> str:
        from llava_med.serve.client import ClientConnectionError, ClientTimeoutError, WorkerError

        client = self._client()
        for attempt in range(self.retries + 1):
            try:
                return client.generate(self.model_id, prompt, list(images), temperature=params.temperature,
                                       top_p=params.top_p, max_new_tokens=params.max_new_tokens,
                                       stop=list(params.stop), seed=params.seed, echo=False)
            except (ClientConnectionError, ClientTimeoutError, WorkerError) as exc:
                code = getattr(exc, "code", ErrorCode.WORKER_UNREACHABLE)
                if attempt == self.retries or (isinstance(exc, WorkerError) and code not in RETRYABLE_CODES):
                    raise LlavaMedError(str(exc), code=_error_code(code)) from exc
                logger.warning("retrying a question after: %s", exc)
                time.sleep(RETRY_DELAY * (attempt + 1))
        raise AssertionError("unreachable")

    async def answer(self, prompt: str, images: Sequence[str], params: SamplingParams) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._generate, prompt, images, params)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for client in self._clients:
                client.close()


def _error_code(code: Any) -> ErrorCode:
    try:
        return ErrorCode(int(code))
    except (TypeError, ValueError):
        return ErrorCode.INTERNAL_ERROR


# ---------------------------------------------------------------------------------------------------------- the run
@dataclass
class RunSummary:
    total: int = 0          # questions in this chunk
    skipped: int = 0        # already in the answers file
    answered: int = 0       # answered now, without error
    errors: int = 0         # answered now with metadata.error
    duplicates: int = 0     # repeated question ids left out of the question file
    error_counts: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        text = (f"{self.answered + self.errors} answered now ({self.errors} with errors), {self.skipped} already in "
                f"the answers file, {self.total} questions")
        if self.duplicates:
            text += f", {self.duplicates} repeated question ids left out"
        return text


def _answer_record(question: Question, text: str, model_id: str, error: LlavaMedError | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if error is not None:
        metadata = {"error": str(error), "error_code": int(error.code)}
        if question.question_id is None:
            metadata["line"] = question.lineno
    return {"question_id": question.question_id, "prompt": question.prompt_text, "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": metadata}


async def _answer(question: Question, backend: Any, args: argparse.Namespace) -> dict[str, Any]:
    try:
        if question.error is not None:
            raise LlavaMedError(question.error, code=ErrorCode.BAD_REQUEST)
        images = (read_image_b64(question, args.image_folder),) if question.image else ()
        rendered = render_chat([Message("user", question.prompt_text, images)], backend.conv_mode)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                stop=rendered.stop, seed=question_seed(args.seed, question))
        text = await backend.answer(rendered.prompt, rendered.images, params)
        return _answer_record(question, text.strip(), backend.model_id, None)
    except LlavaMedError as exc:
        return _answer_record(question, "", backend.model_id, exc)
    except Exception as exc:  # noqa: BLE001 - one question's failure never stops the run
        logger.exception("question %s failed", question.key)
        return _answer_record(question, "", backend.model_id,
                              LlavaMedError(f"{type(exc).__name__}: {exc}", code=ErrorCode.INTERNAL_ERROR))


async def run(args: argparse.Namespace, *, loaded: Any = None) -> RunSummary:
    """Answer the questions of ``args`` (see :func:`build_parser`) into the answers file; ``loaded`` reuses a loaded
    model in the local mode (tests)."""
    questions, duplicates = read_questions(args.question_file)
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx)
    summary = RunSummary(total=len(questions), duplicates=duplicates)
    drop = (lambda rec: bool((rec.get("metadata") or {}).get("error"))) if args.retry_errors else None
    answers = ResultsFile(args.answers_file, answer_key).open(drop)
    try:
        todo = [q for q in questions if q.key not in answers.done]
        summary.skipped = summary.total - len(todo)
        if not todo:
            return summary
        backend: Any = StackBackend(args) if args.controller_url else LocalBackend(args, loaded)
        await backend.start()
        try:
            await _run_all(todo, backend, answers, args, summary)
        finally:
            await backend.close()
    finally:
        answers.close()
    return summary


async def _run_all(todo: list[Question], backend: Any, answers: ResultsFile, args: argparse.Namespace,
                   summary: RunSummary) -> None:
    def count(question: Question, record: dict[str, Any]) -> dict[str, int]:
        error = record["metadata"].get("error")
        if error:
            summary.errors += 1
            code = str(record["metadata"].get("error_code"))
            summary.error_counts[code] = summary.error_counts.get(code, 0) + 1
            logger.warning("question %s: %s", question.key, error)
        else:
            summary.answered += 1
        return {"errors": summary.errors}

    await run_bounded(todo, lambda question: _answer(question, backend, args), answers,
                      concurrency=backend.concurrency, on_record=count, total=summary.total, initial=summary.skipped,
                      unit="answer", desc="model_vqa", no_progress=args.no_progress)


# ---------------------------------------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-med eval model_vqa",
        description="Answer a question file (JSON lines {question_id, image, text}) into an answers file, locally "
                    "(batched) or through a controller's workers. Resumable: rerun the same command to finish.",
        epilog=RESEARCH_ONLY_NOTICE,
    )
    add_model_args(p)  # --model-path (default: the embedded tiny checkpoint), --conv-mode, --device, --dtype, ...
    io = p.add_argument_group("files")
    io.add_argument("--question-file", required=True, help="JSON lines {question_id, image, text}")
    io.add_argument("--image-folder", default="", help="folder the questions' image names are relative to")
    io.add_argument("--answers-file", default="answer.jsonl", help="JSON lines written (appended) here")
    io.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks ...")
    io.add_argument("--chunk-idx", type=int, default=0, help="... and answer this one (0-based)")
    io.add_argument("--retry-errors", action="store_true",
                    help="redo the answers of the file that have metadata.error (they are removed first)")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default here; the original used 0.2) is greedy and reproducible")
    dec.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=1.0, help="default 1.0")
    dec.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1,
                     help="only 1: beam search is not supported by the serving engines")
    dec.add_argument("--max-new-tokens", type=int, default=1024, help="default 1024, the original's")
    dec.add_argument("--seed", type=int, default=0, help="sampled runs: each question's seed derives from it")
    local = p.add_argument_group("local mode (no --controller-url)")
    local.add_argument("--batch-size", type=int, default=8, help="questions decoded together (default 8)")
    stack = p.add_argument_group("stack mode")
    stack.add_argument("--controller-url", default=None,
                       help="send the questions through this controller; every worker of --model shares them")
    stack.add_argument("--model", default=None, help="the served model name (llava-med test-message lists them)")
    stack.add_argument("--concurrency", type=int, default=8, help="questions in flight at once (default 8)")
    stack.add_argument("--retries", type=int, default=2,
                       help="asks again after a broken connection or a busy / unreachable worker (default 2)")
    stack.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds one answer may take to come back (default 600)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_beams != 1:
        parser.error(f"--num_beams {args.num_beams}: only 1 is supported (the serving engines decode greedily or by "
                     f"sampling, not by beam search)")
    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    except LlavaMedError as exc:
        parser.error(str(exc))
    if args.num_chunks < 1 or not 0 <= args.chunk_idx < args.num_chunks:
        parser.error(f"--chunk-idx must be in [0, --num-chunks - 1], got {args.chunk_idx} of {args.num_chunks}")
    if args.controller_url:
        if not args.model:
            parser.error("--controller-url needs --model (the name the workers serve)")
        if args.model_path:
            parser.error("--model-path loads a model here; with --controller-url the workers serve it: give --model")
        if args.concurrency < 1 or args.retries < 0:
            parser.error("--concurrency must be >= 1 and --retries >= 0")
    else:
        if args.model:
            parser.error("--model names a served model: give --controller-url too (or --model-path to run locally)")
        if args.batch_size < 1:
            parser.error("--batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    if not args.controller_url and not args.model_path:
        print("model_vqa: no --model-path: answering with the embedded tiny random-weight checkpoint (noise)",
              file=sys.stderr)

    signals: list[int] = []

    async def supervised() -> RunSummary:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None

        def on_sigterm() -> None:
            signals.append(signal.SIGTERM)
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            return await run(args)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        summary = asyncio.run(supervised())
    except (EvalInputError, EvalSetupError, OSError) as exc:
        print(f"model_vqa: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"model_vqa: interrupted; the answers written so far are in {args.answers_file}: run the same command "
              f"again to finish", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Every finished answer is already written and the file is closed; threads still blocked reading a worker's
        # answer (stack mode) would hold the interpreter's exit until the worker finishes: leave at once.
        os._exit(143 if signals else 130)
    print(f"model_vqa: {summary.line()} -> {args.answers_file}")
    if summary.errors:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(summary.error_counts.items()))
        print(f"model_vqa: {summary.errors} answers carry metadata.error (by error_code: {codes}); rerun with "
              f"--retry-errors to redo them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
