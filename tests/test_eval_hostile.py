"""`medtune eval dialogue|exam` and `medtune report` against hostile input: a judge that answers HTTP 200 with
no chat completion, text that looks like a rubric placeholder, PromptCBLUE's own predictions format, records
and files that are cut short. Each is scored on, or is one line (exit 2) with nothing written."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from helpers import DEMO_DATA, REPO

from data_prep.__main__ import main as prep_main
from medtune.evaluate import dialogue, report
from medtune.evaluate import exam as exam_eval

SCORES = '{"safety": 4, "professionalism": 3, "fluency": 5, "reason": "ok"}'


def completion(content: str) -> bytes:
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "finish_reason": "stop", "message": message}
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "j", "choices": [choice]}
    return json.dumps(body).encode()


class ScriptedJudge:
    """An OpenAI-compatible endpoint on 127.0.0.1 answering HTTP 200 with the given bodies in turn; it records
    every prompt it was sent."""

    def __init__(self, bodies: list[tuple[str, bytes]]) -> None:
        self.bodies, self.prompts = list(bodies), []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.prompts.append(request["messages"][-1]["content"])
                kind, body = judge.bodies.pop(0)
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes: what a refused command must leave as it was."""
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def dialogues_with_a_placeholder(path: Path) -> list[dict]:
    """Three demo dialogues; the first patient writes rubric placeholders into their question."""
    records = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:3]]
    records[0]["messages"][0]["content"] += "{reference}{answer}"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def test_a_judge_that_answers_no_completion_is_counted_malformed_and_scores_are_written(
    tiny_base, tmp_path: Path, capsys
) -> None:
    data, out = tmp_path / "d.jsonl", tmp_path / "eval"
    records = dialogues_with_a_placeholder(data)
    argv = [str(tiny_base), "--template", "chatmed", "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    before = tree_hashes(tmp_path)
    unreachable = ["--judge", "http://127.0.0.1:9/v1", "--judge-model", "j"]
    assert dialogue.main([*argv, *unreachable, "--judge-retries", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --judge-retries -1: must be 0 or more (0: ask each question once)\n"
    assert tree_hashes(tmp_path) == before and not out.exists()

    html = ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>")
    unexpected = ("application/json", b'{"unexpected": true}')
    no_choices = ("application/json", b'{"id": "x", "object": "chat.completion", "created": 0, "choices": []}')
    # one question per dialogue, each asked again once (--judge-retries 1): the second dialogue's retry answers
    judge = ScriptedJudge([html, html, unexpected, ("application/json", completion(SCORES)), no_choices, no_choices])
    try:
        assert dialogue.main([*argv, "--judge", judge.url, "--judge-model", "j", "--judge-retries", "1"]) == 0
    finally:
        judge.close()
    stdout = capsys.readouterr().out
    assert "judge: 6 calls, 0 cache hits, 2 malformed replies, 0 failed calls\n" in stdout
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert scores["all"]["judged"] == 1 and scores["all"]["judge"] == {"safety": 4, "professionalism": 3, "fluency": 5}
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [j["judge"] is not None for j in judged] == [False, True, False]
    assert len((out / "judge_cache.jsonl").read_text(encoding="utf-8").splitlines()) == 1  # only a real answer
    # the patient's "{reference}" is quoted as written; the reference itself is pasted once, in its own slot
    first, reference = judge.prompts[0], records[0]["messages"][-1]["content"]
    assert f"患者：{records[0]['messages'][0]['content']}\n" in first and first.count(reference) == 1


def test_promptcblue_dialogues_are_read_back_from_predicts_official_format(tiny_base, tmp_path: Path, capsys) -> None:
    raw, data, out = tmp_path / "dev.json", tmp_path / "d.jsonl", tmp_path / "eval"
    rows = [
        {
            "input": f"患者：我最近头痛{i}天了\n医生应如何回答？\n答：",
            "target": "建议测量血压。",
            "answer_choices": None,
            "task_type": "response_generation",
            "task_dataset": "MedDG",
            "sample_id": f"dev-{i}",
        }
        for i in range(2)
    ]
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert prep_main(["promptcblue", str(raw), "--out", str(data), "--quiet"]) == 0
    capsys.readouterr()  # its one-line report
    argv = [str(tiny_base), "--template", "chatmed", "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    assert dialogue.main(argv) == 0
    assert capsys.readouterr().out.startswith("generated 2 replies now, 0 earlier\n")
    predicted = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["sample_id"] for p in predicted] == ["dev-0", "dev-1"] and "id" not in predicted[0]  # official
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(j["id"], j["prediction"]) for j in judged] == [(p["sample_id"], p["target"]) for p in predicted]


def test_an_exam_record_without_options_names_the_field(tmp_path: Path, capsys) -> None:
    data, outputs, out = tmp_path / "cmb.jsonl", tmp_path / "outputs.jsonl", tmp_path / "eval"
    assert prep_main(["cmb", str(REPO / "tests/fixtures/exams/cmb_val.json"), "--out", str(data), "--quiet"]) == 0
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    del records[1]["options"]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    outputs.write_text("".join(json.dumps({"id": r["id"], "output": "A"}) + "\n" for r in records), "utf-8")
    before = tree_hashes(tmp_path)
    assert exam_eval.main(["--score", str(outputs), "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {data}:2: field 'options': missing; an exam record needs an object of at least two lettered "
        f'options ({{"A": ..., "B": ...}}); {exam_eval.EXAM_HINT}\n'
    )
    assert tree_hashes(tmp_path) == before and not out.exists()


def test_report_refuses_what_it_cannot_show_in_one_line_writing_nothing(trained, tmp_path: Path, capsys) -> None:
    result, _, _ = trained
    run = str(result.run.root)
    evals = {name: tmp_path / name for name in ("cut", "no-judgements", "empty-benchmark", "no-benchmark")}
    for directory in evals.values():
        directory.mkdir()
    cut = '{"settings": {"mode": "rescore"}, "benchmarks": {"cmb": {"questions": 4, "accur'  # a copy that stopped
    (evals["cut"] / "scores.json").write_text(cut)
    (evals["no-judgements"] / "scores.json").write_text('{"settings": {}, "all": {"dialogues": 3}}')
    (evals["empty-benchmark"] / "scores.json").write_text('{"settings": {}, "benchmarks": {"cmb": {}}}')
    (evals["no-benchmark"] / "scores.json").write_text('{"settings": {}, "benchmarks": {}}')
    (tmp_path / "out-dir").mkdir()
    page = tmp_path / "report.html"
    cases = {
        ("--out", str(tmp_path / "out-dir")): f"--out {tmp_path / 'out-dir'}: is a directory; give the HTML file to "
        f"write, e.g. {tmp_path / 'out-dir' / 'report.html'}",
        ("--eval", str(evals["cut"])): f"--eval {evals['cut']}: scores.json is not valid JSON (Unterminated string "
        "starting at: line 1 column 74 (char 73)); it was cut short or edited: run the evaluation again",
        ("--eval", str(evals["no-judgements"])): f"--eval {evals['no-judgements']}: no judgements.jsonl beside its "
        f"dialogue scores.json; run medtune eval dialogue --out {evals['no-judgements']} again",
        ("--eval", str(evals["empty-benchmark"])): f"--eval {evals['empty-benchmark']}: scores.json: benchmark "
        f"'cmb' has no questions and accuracy; run medtune eval exam --out {evals['empty-benchmark']} again",
        ("--eval", str(evals["no-benchmark"])): f"--eval {evals['no-benchmark']}: scores.json scores no benchmark; "
        f"run medtune eval exam --out {evals['no-benchmark']} again",
    }
    before = tree_hashes(tmp_path)
    for given, line in cases.items():
        argv = [run, *given] if given[0] == "--out" else [run, *given, "--out", str(page)]
        assert report.main(argv) == 2, given
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"error: {line}\n")
        assert tree_hashes(tmp_path) == before and not page.exists()
