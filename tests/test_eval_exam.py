"""`medtune eval exam` and the exam sources of data_prep, on fixtures written in each benchmark's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, tiny_llama_with_tokenizer

from data_prep.__main__ import main as prep_main
from medtune.evaluate import exam as exam_eval
from medtune.infer.generation import GenerationSettings

FIXTURES = REPO / "tests" / "fixtures" / "exams"

# source → (inputs, read, written, skipped by reason)
CONVERSIONS = {
    "cmb": (["cmb_val.json"], 6, 4, {"no answer": 1, "answer not among options": 1}),
    "cmexam": (["cmexam_test.csv"], 4, 3, {"no answer": 1}),
    "medqa-mcmle": (["medqa_mcmle_test.jsonl"], 4, 3, {"malformed JSON": 1}),
    "cmmlu": (["cmmlu/clinical_knowledge.csv", "cmmlu/chinese_history.csv"], 4, 3, {"subject not selected": 1}),
    "ceval": (["ceval/clinical_medicine_val.csv", "ceval/clinical_medicine_test.csv"], 3, 2, {"no answer": 1}),
}


def convert(source: str, out: Path, *extra: str) -> Path:
    inputs = [str(FIXTURES / name) for name in CONVERSIONS[source][0]]
    assert prep_main([source, *inputs, "--out", str(out), "--quiet", *extra]) == 0
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("source", list(CONVERSIONS))
def test_each_benchmark_format_converts_with_counts(source: str, tmp_path: Path, capsys) -> None:
    _, read, written, skipped = CONVERSIONS[source]
    out = convert(source, tmp_path / f"{source}.jsonl")
    summary = capsys.readouterr().out
    records = lines(out)
    reasons: dict[str, int] = {}
    for row in lines(tmp_path / f"{source}.skipped.jsonl"):
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    print(f"{source}: read {read} = written {len(records)} + skipped {sum(reasons.values())}")
    assert f"read {read}; written {written}" in summary
    assert len(records) == written and reasons == skipped and read == written + sum(reasons.values())
    for record in records:
        assert record["source"] == source and record["answer"] and set(record["answer"]) <= set(record["options"])


def test_converted_records_keep_what_scoring_needs(tmp_path: Path) -> None:
    cmb = {r["id"]: r for r in lines(convert("cmb", tmp_path / "cmb.jsonl"))}
    assert list(cmb["1"]["options"]) == ["A", "B", "C", "D"]  # the empty E is not an option (as the prompt drops it)
    assert cmb["2"]["multi"] and cmb["2"]["answer"] == "AC" and cmb["2"]["category"] == ["医师考试", "执业医师"]
    assert cmb["2"]["meta"]["answer_as_written"] == "AC"  # what CMB's score.py compares with
    cmexam = lines(convert("cmexam", tmp_path / "cmexam.jsonl"))
    assert cmexam[2]["answer"] == "AB" and cmexam[2]["multi"] and cmexam[2]["category"] == ["传染科"]
    medqa = lines(convert("medqa-mcmle", tmp_path / "medqa.jsonl"))
    assert [r["answer"] for r in medqa] == ["A", "B", "C"]  # the second line has no answer_idx: found by its text
    every = lines(convert("cmmlu", tmp_path / "all.jsonl", "--subjects", "all"))
    assert len(every) == 4 and {r["category"][0] for r in every} == {"clinical_knowledge", "chinese_history"}


def exam_file(tmp_path: Path) -> Path:
    """CMB (with a multi-answer question), CMExam and MedQA questions in one file."""
    parts = [convert(s, tmp_path / f"{s}.jsonl") for s in ("cmb", "cmexam", "medqa-mcmle")]
    path = tmp_path / "exam.jsonl"
    path.write_text("".join(p.read_text(encoding="utf-8") for p in parts), encoding="utf-8")
    return path


def test_loglik_scores_are_the_models_reply_probabilities(trained, tmp_path: Path) -> None:
    import torch

    from medtune.data.exam_prompts import conversation
    from medtune.data.templates import encode_conversation
    from medtune.infer.generation import load_model_for_inference

    result, _, _ = trained
    data = exam_file(tmp_path)
    scores = exam_eval.evaluate(
        str(result.run.root), data, tmp_path / "ll", "loglik", generation=GenerationSettings(batch_size=4)
    )
    rows = lines(tmp_path / "ll" / "predictions.jsonl")
    records = exam_eval.load_exams(data)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    multi = next(r for r in rows if r["multi"])
    assert len(multi["logprobs"]) == 2**5 - 1  # every non-empty set of five letters
    single = [(r, rec) for r, rec in zip(rows, records, strict=True) if not r["multi"]]
    assert all(len(r["logprobs"]) == len(rec["options"]) for r, rec in single)
    for row in rows:
        assert row["chosen"] == max(row["logprobs"], key=row["logprobs"].get)
        assert row["correct"] == (row["chosen"] == row["answer"])
    # Independently: transformers' own loss on the training encoding of question + reply.
    loaded = load_model_for_inference(str(result.run.root), "fp32", None)
    record, row = records[4], rows[4]
    for candidate in list(row["logprobs"])[:3]:
        messages = conversation(record, []) + [{"role": "assistant", "content": candidate}]
        ids, labels = encode_conversation(loaded.tokenizer, loaded.template, messages, loaded.system_prompt)
        with torch.no_grad():
            loss = loaded.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        n = sum(label != -100 for label in labels[1:])
        print(f"candidate {candidate}: medtune {row['logprobs'][candidate]:.5f}, transformers {-loss * n:.5f}")
        assert row["logprobs"][candidate] == pytest.approx(-loss * n, abs=1e-4)
    cmb = scores["benchmarks"]["cmb"]
    assert cmb["questions"] == 4 and set(cmb["accuracy_per_category"]) == {"医师考试", "护理考试"}
    assert "strict_accuracy" not in cmb  # nothing is extracted in loglik mode


def test_generate_extracts_officially_and_resumes_only_unchanged(trained, tmp_path: Path, capsys) -> None:
    result, _, _ = trained
    data = exam_file(tmp_path)
    out = tmp_path / "gen"
    argv = [str(result.run.root), "--data", str(data), "--out", str(out), "--mode", "generate"]
    argv += ["--max-new-tokens", "8"]
    assert exam_eval.main(argv) == 0
    first = capsys.readouterr().out
    rows = lines(out / "predictions.jsonl")
    fields = {"output", "extracted", "strict", "correct", "strict_correct"}
    assert len(rows) == 10 and all(fields <= set(r) for r in rows)
    assert "cmb: 4 questions" in first and "strict" in first and "empty replies" in first
    assert "answered 10 questions now, 0 earlier" in first
    assert exam_eval.main(argv) == 0  # everything answered: nothing generated again, same scores
    assert json.loads((out / "scores.json").read_text())["settings"]["answered_now"] == 0
    assert "answered 0 questions now, 10 earlier" in capsys.readouterr().out
    assert exam_eval.main([*argv[:-1], "16"]) == 2  # other settings into the same directory
    assert "settings.max_new_tokens" in capsys.readouterr().err


def test_rescoring_saved_outputs(tmp_path: Path, capsys) -> None:
    data = convert("cmb", tmp_path / "cmb.jsonl")
    outputs = {"1": "答案是B。", "2": "答案是CA。", "3": "B", "4": "Answer: C"}  # right, order-wrong, right, luck
    pred = tmp_path / "outputs.jsonl"
    pred.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in outputs.items()), encoding="utf-8")
    assert exam_eval.main(["--score", str(pred), "--data", str(data), "--out", str(tmp_path / "s")]) == 0
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())["benchmarks"]["cmb"]
    # 执业医师 1/2, 执业助理医师 1/1 → 医师考试 0.75; 护士 0/1 → 护理考试 0; average 0.375; micro 2/4
    assert scores["accuracy_per_subcategory"] == {
        "医师考试 / 执业医师": 0.5,
        "医师考试 / 执业助理医师": 1.0,
        "护理考试 / 护士": 0.0,
    }
    assert scores["accuracy_per_category"] == {"医师考试": 0.75, "护理考试": 0.0}
    assert scores["medtune_average"] == 0.375 and scores["accuracy"] == 0.5  # CMB's score.py publishes neither
    assert scores["strict_accuracy"] == 0.5  # "答案是B。" and "B" are answers and nothing else
    rows = {r["id"]: r for r in lines(tmp_path / "s" / "predictions.jsonl")}
    assert rows["2"]["extracted"] == "CA" and rows["2"]["strict"] == "AC" and not rows["2"]["strict_correct"]
    assert rows["4"]["extracted"] == "A" and not rows["4"]["correct"]
    capsys.readouterr()
    pred.write_text(json.dumps({"id": "1", "output": "B"}) + "\n", encoding="utf-8")  # a partial set of outputs
    assert exam_eval.main(["--score", str(pred), "--data", str(data), "--out", str(tmp_path / "t")]) == 2
    assert "3 items of cmb.jsonl have no output" in capsys.readouterr().err


def test_cmexam_weighted_prf_equals_scikit_learn() -> None:
    sklearn = pytest.importorskip("sklearn.metrics")
    from medtune.evaluate.exam_scores import weighted_prf

    gold = ["A", "B", "AB", "C", "A", "E", "D", "AB", "B", "C"]
    pred = ["A", "无答案", "A", "C", "B", "E", "D", "AB", "AB", "无答案"]
    ours = weighted_prf(gold, pred)
    p, r, f, _ = sklearn.precision_recall_fscore_support(gold, pred, average="weighted", zero_division=0)
    print(f"weighted P/R/F1: medtune {ours}, sklearn {(p, r, f)}")
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f), abs=1e-12)


def test_shots_come_from_the_same_benchmark_and_category_never_the_question(tmp_path: Path) -> None:
    from medtune.data.exam_prompts import conversation

    records = exam_eval.load_exams(exam_file(tmp_path))
    shots = exam_eval.pick_shots(records, records, 2)
    first = records[0]  # CMB 医师考试: the other 医师考试 questions come first
    assert [s["id"] for s in shots[first["id"]]] == ["2", "3"]
    assert [s["id"] for s in shots["4"]] == ["1", "2"]  # 护理考试 has no other: the benchmark's first ones
    asked = conversation(first, shots[first["id"]])
    assert [m["role"] for m in asked] == ["user", "assistant", "user", "assistant", "user"]
    assert asked[1]["content"] == "答案是AC。" and asked[-1]["content"].endswith("D. 120~150次/分")
    with pytest.raises(exam_eval.MedtuneError, match="only 2 other cmexam questions"):
        exam_eval.pick_shots(records, records, 3)


def test_few_shot_loglik_asks_a_longer_conversation(trained, tmp_path: Path) -> None:
    result, _, _ = trained
    data = exam_file(tmp_path)
    zero = exam_eval.evaluate(str(result.run.root), data, tmp_path / "zero", "loglik")
    two = exam_eval.evaluate(str(result.run.root), data, tmp_path / "two", "loglik", shots=2)
    assert two["settings"]["shots"] == 2 and zero["settings"]["shots"] == 0
    rows0, rows2 = lines(tmp_path / "zero" / "predictions.jsonl"), lines(tmp_path / "two" / "predictions.jsonl")
    assert any(a["logprobs"] != b["logprobs"] for a, b in zip(rows0, rows2, strict=True))


@pytest.mark.skipif(
    not (REPO.parent / "shared" / "tokenizers" / "chinese_llama2").is_dir(), reason="../shared/tokenizers needed"
)
def test_loglik_on_a_real_sentencepiece_tokenizer_without_a_pad_token(tmp_path: Path) -> None:
    """A plain model directory (no template recorded: --template), Chinese-LLaMA-2's tokenizer (no pad token)."""
    from medtune.data.exam_prompts import conversation
    from medtune.data.templates import encode_conversation, get_template
    from medtune.data.tokenizer import load_tokenizer

    base = tmp_path / "base"
    tiny_llama_with_tokenizer(base, REPO.parent / "shared" / "tokenizers" / "chinese_llama2")
    data = exam_file(tmp_path)
    argv = [str(base), "--data", str(data), "--out", str(tmp_path / "e"), "--template", "llama2_zh"]
    assert exam_eval.main(argv) == 0
    rows = lines(tmp_path / "e" / "predictions.jsonl")
    assert len(rows) == 10 and all(r["chosen"] in r["logprobs"] for r in rows)
    # The scored tokens are the reply's trained tokens of the authors' format: the letter and </s>.
    tokenizer = load_tokenizer(str(base))
    record = exam_eval.load_exams(data)[0]
    ids, labels = encode_conversation(
        tokenizer, get_template("llama2_zh"), conversation(record, []) + [{"role": "assistant", "content": "B"}]
    )
    trained_ids = [i for i in labels if i != -100]
    assert tokenizer.convert_ids_to_tokens(trained_ids) == ["▁B", "</s>"]
