"""LLaVA-Med Bench review: a judge model compares the model's answers with the reference (GPT-4) answers.

    export OPENAI_API_KEY=...        # or any variable named by --api-key-env; none needed for a local vLLM
    llava-med eval chat_judge --question-file llava_med_eval_qa50_qa.jsonl --answers-file answers.jsonl \\
        --scores-file scores.jsonl --judge-url https://api.openai.com/v1 --judge-model gpt-4-0314
    llava-med eval summarize_judge --scores-file scores.jsonl

Questions: the LLaVA-Med Bench file (``question_id, image, text, gpt4_answer, fig_caption, fig_label,
in_text_mention, type, domain``); answers: a ``model_vqa`` answers file. They are joined by ``question_id``
(questions without an answer, or whose answer has ``metadata.error``, are reported and not judged). Each pair is
sent with the original judging prompt (system message and user message as in LLaVA-Med's
``eval_multimodal_chat_gpt_score.py``, temperature 0) to any OpenAI-compatible chat-completions endpoint: OpenAI,
Azure OpenAI (``--azure-api-version``; ``--judge-model`` is then the deployment), a local vLLM or this project's own
API. ``--concurrency`` requests run at once; 429 and 5xx answers and broken connections are retried with
exponential backoff (honouring ``Retry-After``) by the official ``openai`` client.

Scores file: one JSON line per judged question, the question's fields plus ``question``, ``ans1`` (reference),
``ans2`` (model), ``gpt_eval`` (the judge's reply), ``scores`` (``[reference, model]``, or null when the reply does
not hold two scores: counted, never a crash) and ``error`` (the judge could not be asked). Resumable: judged ids are
skipped; ``--retry-errors`` redoes failed and unparsable ones.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from llava_med.eval.files import EvalInputError, ResultsFile, id_key, iter_jsonl, load_records, run_bounded
from llava_med.eval.summarize_judge import format_summary, parse_scores, summarize

__all__ = ["INSTRUCT_PROMPT", "SYSTEM_PROMPT", "build_parser", "judge_messages", "main", "run"]

logger = logging.getLogger(__name__)

# The judging prompt of LLaVA-Med's eval_multimodal_chat_gpt_score.py, character for character (the leading quote of
# the system message and the two-space indents included): the scores are only comparable under the same prompt.
SYSTEM_PROMPT = "'You are a helpful and precise assistant for checking the quality of the answer."
INSTRUCT_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question on observing an image. For your reference, the visual content in the "
    "image is represented with caption describing the same image.\n"
    "  Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives "
    "an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "  Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive "
    "explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses "
    "were presented does not affect your judgment."
)
ROLE = "Assistant"


def _context(value: Any, style: str) -> str:
    """The ``Figure Context`` of the prompt. ``original``: as the original formatted ``in_text_mention`` (Python's
    ``str()`` of the list); ``text``: the mentions' sentences, one per line."""
    if style == "text" and isinstance(value, list):
        sentences = [m.get("tokens", "") if isinstance(m, dict) else str(m) for m in value]
        return "\n\t- ".join(s for s in sentences if s)
    return str(value)


def judge_messages(question: dict[str, Any], answer: str, context_style: str = "original") -> list[dict[str, str]]:
    """The chat messages that ask the judge to score the reference answer (1) and the model's answer (2)."""
    user = (f"[Context]\n"
            f"Figure Caption:\n{question.get('fig_label')}: {question.get('fig_caption')}\n\n"
            f"Figure Context:\n\t- {_context(question.get('in_text_mention'), context_style)}\n\n"
            f"[Question]\n{question.get('text')}\n\n"
            f"[{ROLE} 1]\n{question.get('gpt4_answer')}\n\n[End of {ROLE} 1]\n\n"
            f"[{ROLE} 2]\n{answer}\n\n[End of {ROLE} 2]\n\n"
            f"[System]\n{INSTRUCT_PROMPT}\n\n")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def make_client(args: argparse.Namespace) -> Any:
    try:
        import openai
    except ImportError as exc:  # pragma: no cover - the eval extra installs it
        raise EvalInputError("chat_judge needs the openai package: pip install 'llava-med-serve[eval]'") from exc
    key = os.environ.get(args.api_key_env) or None
    if key is None:
        logger.info("%s is not set: sending no real API key (fine for a local server)", args.api_key_env)
    common = {"api_key": key or "none", "max_retries": args.max_retries, "timeout": args.timeout}
    if args.azure_api_version:
        return openai.AsyncAzureOpenAI(azure_endpoint=args.judge_url, api_version=args.azure_api_version, **common)
    return openai.AsyncOpenAI(base_url=args.judge_url, **common)


async def _judge_one(client: Any, args: argparse.Namespace, question: dict[str, Any], answer: str
                     ) -> dict[str, Any]:
    import openai

    record = dict(question)
    record.update({"question": question.get("text"), "ans1": question.get("gpt4_answer"), "ans2": answer,
                   "judge_model": args.judge_model})
    kwargs: dict[str, Any] = {"model": args.judge_model, "temperature": args.judge_temperature,
                              "messages": judge_messages(question, answer, args.context_style)}
    if args.judge_max_tokens:
        kwargs["max_tokens"] = args.judge_max_tokens
    try:
        response = await client.chat.completions.create(**kwargs)
        reply = response.choices[0].message.content if response.choices else None
    except openai.APIError as exc:
        status = getattr(exc, "status_code", None)
        record.update({"gpt_eval": None, "scores": None,
                       "error": f"the judge failed{f' (HTTP {status})' if status else ''}: {exc}"})
        return record
    scores = parse_scores(reply)
    record.update({"gpt_eval": reply, "scores": list(scores) if scores else None})
    return record


def _pairs(args: argparse.Namespace) -> tuple[list[tuple[dict[str, Any], str]], dict[str, list[Any]]]:
    questions = load_records(args.question_file)
    answers: dict[str, dict[str, Any]] = {}
    for line in iter_jsonl(args.answers_file):
        if line.record is not None and line.record.get("question_id") is not None:
            answers.setdefault(id_key(line.record["question_id"]), line.record)
    pairs, report = [], {"unanswered": [], "failed_answers": []}
    for q in questions:
        answer = answers.get(id_key(q.get("question_id")))
        if answer is None:
            report["unanswered"].append(q.get("question_id"))
        elif (answer.get("metadata") or {}).get("error") or not isinstance(answer.get("text"), str):
            report["failed_answers"].append(q.get("question_id"))
        else:
            pairs.append((q, answer["text"]))
    return pairs, report


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Judge what is not judged yet; returns counts (and the pairs the answers file lacked)."""
    pairs, report = _pairs(args)
    drop = (lambda r: bool(r.get("error")) or r.get("scores") is None) if args.retry_errors else None
    scores = ResultsFile(args.scores_file, lambda r: id_key(r["question_id"]) if "question_id" in r else None)
    scores.open(drop)
    counts = {"judged": 0, "malformed": 0, "errors": 0, "skipped": 0, **{k: len(v) for k, v in report.items()}}
    try:
        todo = [(q, a) for q, a in pairs if id_key(q.get("question_id")) not in scores.done]
        counts["skipped"] = len(pairs) - len(todo)
        if not todo:
            return counts
        client = make_client(args)

        def count(pair: tuple[dict[str, Any], str], record: dict[str, Any]) -> dict[str, int]:
            question = pair[0]
            if record.get("error"):
                counts["errors"] += 1
                logger.warning("question %s: %s", question.get("question_id"), record["error"])
            elif record["scores"] is None:
                counts["malformed"] += 1
                logger.warning("question %s: the judge's reply holds no two scores: %r", question.get("question_id"),
                               (record["gpt_eval"] or "")[:200])
            else:
                counts["judged"] += 1
            return {"malformed": counts["malformed"], "errors": counts["errors"]}

        try:
            await run_bounded(todo, lambda pair: _judge_one(client, args, *pair), scores,
                              concurrency=args.concurrency, on_record=count, total=len(pairs),
                              initial=counts["skipped"], unit="review", desc="chat_judge",
                              no_progress=args.no_progress)
        finally:
            await client.close()
    finally:
        scores.close()
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-med eval chat_judge",
        description="Score model answers against LLaVA-Med Bench's reference answers with a judge model behind an "
                    "OpenAI-compatible API (the original judging prompt). Resumable.",
    )
    p.add_argument("--question-file", required=True, help="llava_med_eval_qa50_qa.jsonl (or the same format)")
    p.add_argument("--answers-file", required=True, help="answers file of model_vqa")
    p.add_argument("--scores-file", required=True, help="JSON lines written (appended) here")
    p.add_argument("--judge-url", required=True,
                   help="base URL of the API (https://api.openai.com/v1, http://localhost:8000/v1, or the Azure "
                        "endpoint with --azure-api-version)")
    p.add_argument("--judge-model", required=True, help="model (Azure: deployment) name, e.g. gpt-4-0314")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default %(default)s; unset: no key is sent)")
    p.add_argument("--azure-api-version", default=None, help="talk to Azure OpenAI with this api-version")
    p.add_argument("--concurrency", type=int, default=4, help="requests at once (default 4)")
    p.add_argument("--max-retries", type=int, default=6,
                   help="retries of a request after 429, 5xx or a broken connection, with backoff (default 6)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--judge-temperature", type=float, default=0.0, help="default 0, the original's")
    p.add_argument("--judge-max-tokens", type=int, default=None, help="cap on the reply's tokens (default: none)")
    p.add_argument("--context-style", choices=["original", "text"], default="original",
                   help="Figure Context as the original wrote it (str() of in_text_mention) or as plain sentences")
    p.add_argument("--retry-errors", action="store_true", help="redo failed and unparsable reviews of the file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_retries < 0:
        parser.error("--concurrency must be >= 1 and --max-retries >= 0")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        counts = asyncio.run(run(args))
        records = [line.record for line in iter_jsonl(args.scores_file) if line.record is not None]
    except (EvalInputError, OSError) as exc:
        print(f"chat_judge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chat_judge: interrupted; the reviews so far are in {args.scores_file}: run the same command again "
              f"to finish", file=sys.stderr)
        return 130
    print(f"chat_judge: {counts['judged']} judged now, {counts['malformed']} replies without two scores, "
          f"{counts['errors']} judge failures, {counts['skipped']} already in {args.scores_file}")
    if counts["unanswered"] or counts["failed_answers"]:
        print(f"chat_judge: not judged: {counts['unanswered']} questions without an answer, "
              f"{counts['failed_answers']} answers with metadata.error (run model_vqa first / --retry-errors)")
    print(format_summary(summarize(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
