"""The question each exam benchmark asks, and the reply its few-shot examples give.

A question is put to the model as the user turn of the model's own chat template (the ids it was
trained on); the text of that turn is the benchmark's own prompt where it publishes one:

- CMB: the no-analysis prompt of FreedomIntelligence/CMB (workers/base.py ``query_prompt_2``), options
  as "A. text" lines, leaving out those its code drops (``len(text) <= 1``; data_prep names them in
  meta.cmb_prompt_leaves_out); a few-shot reply is "答案是X。" as its ``format_fewshot_user_and_gpt`` writes.
- CMExam: template 1 of src/preprocess/prompt_templates.py ("问题: …, \\n 选项: …"), the options in
  the CSV's own "A text" lines; reply "答案: X".
- C-Eval and CMMLU: their official zero-shot prompts, the subject's Chinese name in them; reply "X".
- MedQA-MCMLE: OpenCompass's MedQA_gen_3bf756 asks in English ("ANSWER: $LETTER"); medtune asks its Chinese
  questions in the C-Eval style and says so in the scores.
"""

from __future__ import annotations

PROMPT_VERSION = "2"  # recorded in every eval's fingerprint: a changed prompt is a different evaluation
# 2: CMB's prompt leaves out the options its code drops (text of one character or none), as CMB does.


def _lines(record: dict, sep: str, leave_out: frozenset[str] = frozenset()) -> str:
    return "\n".join(f"{letter}{sep}{text}" for letter, text in record["options"].items() if letter not in leave_out)


def question_prompt(record: dict) -> str:
    source, meta = record["source"], record.get("meta", {})
    question = record["question"]
    if source == "cmb":
        return (
            f"以下是中国{meta.get('exam_type', '')}中{meta.get('exam_class', '')}考试的一道"
            f"{meta.get('question_type', '单项选择题')}，不需要做任何分析和解释，直接输出答案选项。\n"
            f"{question}\n{_lines(record, '. ', frozenset(meta.get('cmb_prompt_leaves_out', ())))}"
        )
    if source == "cmexam":
        return f"问题: {question}, \n 选项: {_lines(record, ' ')}"
    if source == "ceval":
        subject = meta.get("subject_zh", "")
        return (
            f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
            f"{question}\n{_lines(record, '. ')}\n答案："
        )
    if source == "cmmlu":
        subject = meta.get("subject_zh", "")
        return (
            f"以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
            f"题目：{question}\n{_lines(record, '. ')}\n答案是："
        )
    kind = "多项选择题" if record["multi"] else "单项选择题"
    return f"以下是中国医师资格考试的一道{kind}，请选出其中的正确答案。\n\n{question}\n{_lines(record, '. ')}\n答案："


def shot_reply(record: dict) -> str:
    """The assistant turn of a few-shot example, in the benchmark's own answer format."""
    answer = record["answer"]
    if record["source"] == "cmb":
        return f"答案是{answer}。"
    if record["source"] == "cmexam":
        return f"答案: {answer}"
    return answer


def conversation(record: dict, shots: list[dict]) -> list[dict[str, str]]:
    """Few-shot examples as earlier turns of the chat, then the question."""
    messages: list[dict[str, str]] = []
    for shot in shots:
        messages += [
            {"role": "user", "content": question_prompt(shot)},
            {"role": "assistant", "content": shot_reply(shot)},
        ]
    return messages + [{"role": "user", "content": question_prompt(record)}]
