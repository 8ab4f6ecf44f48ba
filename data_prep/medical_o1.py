"""medical-o1-reasoning-SFT: {"Question", "Complex_CoT", "Response"}, a JSON array (or JSON lines).

The SFT data of HuatuoGPT-o1 (FreedomIntelligence/medical-o1-reasoning-SFT; Chinese and English
versions share the keys). Each record becomes one exchange whose assistant message keeps the
chain of thought apart from the answer: {"role": "assistant", "content": Response,
"reasoning": Complex_CoT}. The data exists for its reasoning, so a record without any is reported
("no reasoning") rather than written as a plain question and answer.
"""

from data_prep.pipeline import Item, Options, Skip, chat, record_id, text_field

SOURCE = "medical-o1"


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    question = text_field(obj, "Question")
    if not question:
        raise Skip("empty question", "'Question' is blank")
    response = text_field(obj, "Response")
    if not response:
        raise Skip("empty answer", "'Response' is blank")
    reasoning = text_field(obj, "Complex_CoT", required=False)
    if not reasoning:
        raise Skip("no reasoning", f"'Complex_CoT' is {'blank' if obj.get('Complex_CoT') is not None else 'missing'}")
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": response, "reasoning": reasoning},
    ]
    return [chat(record_id(obj, item, SOURCE, "id"), SOURCE, messages)]
