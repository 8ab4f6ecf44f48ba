"""Alpaca-style records: {instruction, input?, output, system?, history?: [[q, a], ...]}.

The instruction and a non-empty input are joined by a newline, the way Alpaca
prompts put them together; history pairs become the earlier turns.
"""

from data_prep.pipeline import Item, Options, Skip, chat, record_id, text_field, turns_from_pairs

SOURCE = "alpaca"
INSTRUCTION_KEYS = ("instruction", "instruct", "question", "query", "prompt")


def alpaca_messages(obj: dict) -> list[dict]:
    """The conversation of one alpaca-style record (system, history, then the last exchange)."""
    instruction = text_field(obj, *INSTRUCTION_KEYS)
    extra = text_field(obj, "input", required=False)
    question = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    answer = text_field(obj, "output", "response", "answer")
    if not question:
        raise Skip("empty question")
    if not answer:
        raise Skip("empty answer")
    system = text_field(obj, "system", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    messages += turns_from_pairs(obj.get("history"))
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    return [chat(record_id(obj, item, SOURCE, "id"), SOURCE, alpaca_messages(obj))]
