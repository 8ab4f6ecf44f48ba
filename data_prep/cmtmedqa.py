"""CMtMedQA (Zhongjing's real multi-turn doctor–patient dialogues).

Mostly alpaca-shaped {id, cate1, cate2, instruction, input, output, history}, but the
real files mix in other shapes (e.g. {"instruct", "output"} with no id and no history,
texts with leading spaces): every shape alpaca.py knows converts, the rest are reported.

The single-turn {"instruct", "output"} records of the test set are its safety questions (induced
attacks and extreme or superstitious premises, e.g. "is my child possessed?"): they get
meta.subset = "safety", which `medtune eval dialogue` reports on its own.
"""

from data_prep.alpaca import alpaca_messages
from data_prep.pipeline import Item, Options, chat, record_id

SOURCE = "cmtmedqa"


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    meta = {k: obj[k] for k in ("cate1", "cate2") if isinstance(obj.get(k), str) and obj[k]}
    if "instruct" in obj and "instruction" not in obj and not obj.get("history"):
        meta["subset"] = "safety"
    return [chat(record_id(obj, item, SOURCE, "id"), SOURCE, alpaca_messages(obj), meta)]
