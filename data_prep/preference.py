"""Preference pairs for reward models / DPO.

Zhongjing / LLaMA-Factory pairwise rows {instruction, input, output: [chosen, rejected], history?},
or the common {prompt, chosen, rejected}. Output: the prompt as `messages` (ending with the
user turn) plus `chosen` and `rejected` replies.
"""

from data_prep.alpaca import INSTRUCTION_KEYS
from data_prep.pipeline import Item, Options, Skip, record_id, text_field, turns_from_pairs

SOURCE = "preference"


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    instruction = text_field(obj, *INSTRUCTION_KEYS)
    extra = text_field(obj, "input", required=False)
    question = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    if not question:
        raise Skip("empty question")
    if "chosen" in obj or "rejected" in obj:
        chosen, rejected = text_field(obj, "chosen"), text_field(obj, "rejected")
    else:
        pair = obj.get("output")
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise Skip("missing field", "'output' as [chosen, rejected] (or 'chosen' and 'rejected')")
        chosen, rejected = pair[0].strip(), pair[1].strip()
    if not chosen or not rejected:
        raise Skip("empty answer", "chosen or rejected is empty")
    if chosen == rejected:
        raise Skip("identical pair", "chosen and rejected are the same text")
    messages = turns_from_pairs(obj.get("history")) + [{"role": "user", "content": question}]
    return [
        {
            "id": record_id(obj, item, SOURCE, "id"),
            "source": SOURCE,
            "messages": messages,
            "chosen": chosen,
            "rejected": rejected,
            "meta": {},
        }
    ]
