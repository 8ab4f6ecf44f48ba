"""Huatuo26M-style records whose `instruction` and `output` are lists (turn by turn)."""

from data_prep.pipeline import Item, Options, Skip, chat, record_id

SOURCE = "huatuo"


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    questions, answers = obj.get("instruction"), obj.get("output")
    if questions is None or answers is None:
        raise Skip("missing field", "'instruction' or 'output'")
    questions = [questions] if isinstance(questions, str) else questions
    answers = [answers] if isinstance(answers, str) else answers
    if not (isinstance(questions, list) and isinstance(answers, list)):
        raise Skip("invalid field", "'instruction' and 'output' must be lists of texts")
    if len(questions) != len(answers) or not questions:
        raise Skip("invalid field", f"{len(questions)} questions but {len(answers)} answers")
    messages = []
    for question, answer in zip(questions, answers, strict=True):
        if not isinstance(question, str) or not isinstance(answer, str):
            raise Skip("invalid field", "a turn is not text")
        if not question.strip():
            raise Skip("empty question")
        if not answer.strip():
            raise Skip("empty answer")
        messages += [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}]
    extra = obj.get("input")
    if isinstance(extra, str) and extra.strip():
        messages[0]["content"] += "\n" + extra.strip()
    return [chat(record_id(obj, item, SOURCE, "id"), SOURCE, messages)]
