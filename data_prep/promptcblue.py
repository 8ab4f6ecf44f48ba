"""PromptCBLUE (16 CBLUE tasks as prompt → answer text).

Lines are {input, target, answer_choices, task_type, task_dataset, sample_id}.

The prompt is kept verbatim (the benchmark's rule), except that ``--strip-answer-cue``
removes every "答：" as the official LLaMA baseline does before applying its own
``问：…答：`` template. A test file (empty target) becomes prompt-only records.
The fields the scorer needs stay in ``meta``.
"""

from data_prep.pipeline import Item, Options, Skip, chat

SOURCE = "promptcblue"


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    prompt = obj.get("input")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Skip("missing field", "'input'")
    for key in ("task_dataset", "sample_id"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise Skip("missing field", repr(key))
    if "target" not in obj or not isinstance(obj["target"], str):
        raise Skip("missing field", "'target' (use an empty string for test prompts)")
    if options.strip_answer_cue:
        prompt = prompt.replace("答：", "").strip()
    messages = [{"role": "user", "content": prompt}]
    target = obj["target"].strip()
    if target:
        messages.append({"role": "assistant", "content": target})
    meta = {
        "sample_id": obj["sample_id"],
        "task_dataset": obj["task_dataset"],
        "task_type": obj.get("task_type"),
        "answer_choices": obj.get("answer_choices"),
        "input": obj["input"],  # the verbatim prompt, for the official predictions file
    }
    return [chat(obj["sample_id"], SOURCE, messages, meta)]
