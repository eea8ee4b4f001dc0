"""chat_judge against a fake OpenAI-compatible judge on 127.0.0.1 (malformed reply, 429 then success), resume,
and the summary's exact values."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from servers import ThreadedServer

from llava_med.eval import chat_judge, summarize_judge
from llava_med.eval.chat_judge import SYSTEM_PROMPT, judge_messages
from llava_med.eval.summarize_judge import parse_scores

API_KEY = "sk-test-judge"


def _domain(*names: str) -> dict[str, bool]:
    return {d: d in names for d in ("chest_xray", "mri", "ct_scan", "histology", "gross")}


QUESTIONS = [
    {"question_id": 0, "type": "conversation", "domain": _domain("chest_xray")},
    {"question_id": 1, "type": "conversation", "domain": _domain("mri")},
    {"question_id": 2, "type": "detailed_description", "domain": _domain("chest_xray")},
    {"question_id": 3, "type": "detailed_description", "domain": _domain("gross", "histology")},
    {"question_id": 4, "type": "conversation", "domain": _domain("ct_scan")},
    {"question_id": 5, "type": "conversation", "domain": _domain("mri")},  # never answered by the model
]
for _q in QUESTIONS:
    _q.update({"image": f"{_q['question_id']}.jpg", "text": f"Question number {_q['question_id']}?\n<image>",
               "gpt4_answer": f"Reference answer {_q['question_id']}.", "fig_caption": "A caption.",
               "fig_label": "Fig. 1", "in_text_mention": [{"tokens": "As seen in Fig. 1 .", "entities": []}],
               "pair_id": "p"})

REPLIES = {
    0: "8 6\nAssistant 1 is more detailed.",
    1: "9 3\nAssistant 2 misses the point.",
    2: "Both answers are fine, I cannot rate them.",              # malformed: no two scores
    3: "7 7\nEqually good.",                                       # after one 429
    4: "Assistant 1: 10\nAssistant 2: 5\nThe first is better.",   # labelled scores over two lines
}


class FakeJudge:
    def __init__(self) -> None:
        self.calls: Counter[int] = Counter()
        self.bodies: list[dict] = []
        self.auth: set[str] = set()
        self.app = FastAPI()

        self.azure: list[tuple[str, str, str]] = []  # (deployment, api-version, api-key header)

        @self.app.post("/openai/deployments/{deployment}/chat/completions")
        async def azure_completions(deployment: str, request: Request) -> JSONResponse:
            self.azure.append((deployment, request.query_params.get("api-version", ""),
                               request.headers.get("api-key", "")))
            return await completions(request)

        @self.app.post("/v1/chat/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            self.bodies.append(body)
            self.auth.add(request.headers.get("authorization", ""))
            qid = int(re.search(r"Question number (\d+)", body["messages"][1]["content"]).group(1))
            self.calls[qid] += 1
            if qid == 3 and self.calls[qid] == 1:
                return JSONResponse({"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                    status_code=429, headers={"retry-after-ms": "20"})
            return JSONResponse({
                "id": f"chatcmpl-{qid}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": REPLIES[qid]}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })


@pytest.fixture
def judge():
    fake = FakeJudge()
    with ThreadedServer(fake.app) as server:
        yield fake, server.url + "/v1"


def _files(tmp_path):
    qfile, afile = tmp_path / "qa50.jsonl", tmp_path / "answers.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    answers = [{"question_id": q["question_id"], "prompt": "x", "text": f"Model answer {q['question_id']}.",
                "answer_id": "a", "model_id": "m", "metadata": {}} for q in reversed(QUESTIONS[:5])]
    afile.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return qfile, afile, tmp_path / "out" / "scores.jsonl"


def _argv(qfile, afile, scores, url, *extra):
    return ["--question-file", str(qfile), "--answers-file", str(afile), "--scores-file", str(scores),
            "--judge-url", url, "--judge-model", "judge-1", "--api-key-env", "TEST_JUDGE_KEY", "--no-progress",
            *extra]


def test_judge_scores_file_summary_and_resume(judge, tmp_path, monkeypatch, capsys):
    fake, url = judge
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    qfile, afile, scores = _files(tmp_path)
    assert chat_judge.main(_argv(qfile, afile, scores, url, "--concurrency", "3")) == 0
    out = capsys.readouterr().out
    assert "4 judged now, 1 replies without two scores, 0 judge failures" in out
    assert "1 questions without an answer" in out

    records = {r["question_id"]: r for r in map(json.loads, scores.read_text().splitlines())}
    assert sorted(records) == [0, 1, 2, 3, 4], "one review per answered question, none twice"
    assert records[2]["scores"] is None and records[2]["gpt_eval"] == REPLIES[2]
    assert [records[i]["scores"] for i in (0, 1, 3, 4)] == [[8, 6], [9, 3], [7, 7], [10, 5]]
    assert records[1]["ans1"] == "Reference answer 1." and records[1]["ans2"] == "Model answer 1."
    assert fake.calls[3] == 2, "the 429 was retried once"
    assert fake.auth == {f"Bearer {API_KEY}"}
    assert {b["model"] for b in fake.bodies} == {"judge-1"} and {b["temperature"] for b in fake.bodies} == {0.0}

    # The summary: the first marked domain counts (question 3 is histology, not gross); relative = mean of ratios.
    summary_json = tmp_path / "summary.json"
    assert summarize_judge.main(["--scores-file", str(scores), "--json", str(summary_json)]) == 0
    text = capsys.readouterr().out
    assert "1 judge replies without two scores (left out): 2" in text
    summary = json.loads(summary_json.read_text())
    table = summary["table"]
    assert list(table) == ["conversation", "detailed_description", "chest_xray", "mri", "histology", "ct_scan",
                           "overall"]
    assert table["conversation"] == pytest.approx({"gpt4_score": 9.0, "pred_score": 14 / 3,
                                                   "pred_relative_score": 100 * (6 / 8 + 3 / 9 + 5 / 10) / 3,
                                                   "data_size": 3})
    assert table["detailed_description"] == {"gpt4_score": 7.0, "pred_score": 7.0, "pred_relative_score": 100.0,
                                             "data_size": 1}
    assert table["chest_xray"]["pred_relative_score"] == pytest.approx(75.0)
    assert table["mri"]["data_size"] == 1 and table["histology"]["data_size"] == 1
    assert table["overall"] == pytest.approx({"gpt4_score": 8.5, "pred_score": 5.25,
                                              "pred_relative_score": 100 * (0.75 + 1 / 3 + 1 + 0.5) / 4,
                                              "data_size": 4})
    assert summary["counts"]["malformed"] == 1 and summary["counts"]["scored"] == 4

    # Resume: nothing left to judge; --retry-errors asks again only for the malformed one.
    calls_before = sum(fake.calls.values())
    assert chat_judge.main(_argv(qfile, afile, scores, url)) == 0
    assert sum(fake.calls.values()) == calls_before
    assert chat_judge.main(_argv(qfile, afile, scores, url, "--retry-errors")) == 0
    assert fake.calls[2] == 2 and sum(fake.calls.values()) == calls_before + 1
    assert sorted(json.loads(x)["question_id"] for x in scores.read_text().splitlines()) == [0, 1, 2, 3, 4]


def test_azure_openai_deployment_and_key_header(judge, tmp_path, monkeypatch, capsys):
    fake, url = judge
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    qfile, afile, scores = _files(tmp_path)
    azure_endpoint = url.removesuffix("/v1")
    assert chat_judge.main(_argv(qfile, afile, scores, azure_endpoint, "--azure-api-version", "2024-06-01")) == 0
    assert "4 judged now" in capsys.readouterr().out
    assert set(fake.azure) == {("judge-1", "2024-06-01", API_KEY)}
    assert len(fake.azure) == 6  # five questions, one of them twice (the 429)


def test_unreachable_judge_is_recorded_and_counted(tmp_path, capsys):
    from llava_med.serve.processes import free_port

    qfile, afile, scores = _files(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    assert chat_judge.main(_argv(qfile, afile, scores, url, "--max-retries", "0", "--timeout", "5")) == 0
    assert "0 judged now, 0 replies without two scores, 5 judge failures" in capsys.readouterr().out
    records = [json.loads(x) for x in scores.read_text().splitlines()]
    assert len(records) == 5 and all(r["error"] and r["scores"] is None for r in records)


def test_prompt_is_the_original_layout():
    q = QUESTIONS[0]
    system, user = judge_messages(q, "Mine.")
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["content"].startswith("[Context]\nFigure Caption:\nFig. 1: A caption.\n\nFigure Context:\n\t- [{'tokens'")
    assert "[Question]\nQuestion number 0?\n<image>\n\n[Assistant 1]\nReference answer 0.\n\n[End of Assistant 1]" \
        in user["content"]
    assert "[Assistant 2]\nMine.\n\n[End of Assistant 2]\n\n[System]\nWe would like" in user["content"]
    assert judge_messages(q, "Mine.", "text")[1]["content"].count("Figure Context:\n\t- As seen in Fig. 1 .\n") == 1


@pytest.mark.parametrize(("reply", "scores"), [
    ("8 6\nexplanation", (8.0, 6.0)),
    ("  7.5, 9\n", (7.5, 9.0)),
    ("8/10 6/10", (8.0, 6.0)),
    ("Assistant 1: 9 Assistant 2: 4", (9.0, 4.0)),
    ("Scores:\nAssistant 1 - 6\nAssistant 2 - 8", (6.0, 8.0)),
    ("8\nbecause", None),
    ("8 6 7", None),
    ("80 60", None),
    ("", None),
    (None, None),
])
def test_parse_scores(reply, scores):
    assert parse_scores(reply) == scores
