"""CMtMedQA (Zhongjing's real multi-turn doctor–patient dialogues).

Mostly alpaca-shaped {id, cate1, cate2, instruction, input, output, history}, but the
real files mix in other shapes (e.g. {"instruct", "output"} with no id and no history,
texts with leading spaces): every shape alpaca.py knows converts, the rest are reported.
"""

from data_prep.alpaca import alpaca_messages
from data_prep.pipeline import Item, Options, chat, record_id

SOURCE = "cmtmedqa"


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    meta = {k: obj[k] for k in ("cate1", "cate2") if isinstance(obj.get(k), str) and obj[k]}
    return [chat(record_id(obj, item, SOURCE, "id"), SOURCE, alpaca_messages(obj), meta)]
