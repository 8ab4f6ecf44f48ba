"""ChatMed_Consult_Dataset and ChatMed_TCM_Dataset: {"query", "response"} JSON lines.

Some distributions wrap the query as ``<s>问：\\n…\\n答：\\n`` (the ChatMed prompt); the
wrapper is removed so that the recipe's template is applied exactly once.
"""

from data_prep.pipeline import Item, Options, Skip, chat, record_id, text_field


def strip_chatmed_wrapper(query: str) -> str:
    text = query.strip()
    for prefix in ("<s>", "问：", "问:"):
        if text.startswith(prefix):
            text = text[len(prefix) :].lstrip()
    for suffix in ("</s>", "答：", "答:"):
        if text.endswith(suffix):
            text = text[: -len(suffix)].rstrip()
    return text


def make_converter(source: str):
    def convert(obj: dict, item: Item, options: Options) -> list[dict]:
        query = strip_chatmed_wrapper(text_field(obj, "query", "instruction", "question"))
        response = text_field(obj, "response", "output", "answer")
        if not query:
            raise Skip("empty question")
        if not response:
            raise Skip("empty answer")
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return [chat(record_id(obj, item, source, "id"), source, messages)]

    return convert
