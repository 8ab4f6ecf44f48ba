"""ShareGPT-style conversations: {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}
(or {"messages": [{"role", "content"}]}); a top-level "system" (LLaMA-Factory's layout) is the first message."""

from data_prep.pipeline import Item, Options, Skip, chat, record_id

SOURCE = "sharegpt"
ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    turns = obj.get("conversations", obj.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise Skip("missing field", "'conversations' (or 'messages') as a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Skip("invalid field", f"turn {i} is not an object")
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise Skip("invalid field", f"turn {i}: unknown speaker or no text")
        messages.append({"role": role, "content": content.strip()})
    system = obj.get("system")
    if isinstance(system, str) and system.strip():  # LLaMA-Factory's ShareGPT files keep it beside the turns
        if messages and messages[0]["role"] == "system":
            raise Skip("invalid field", "a top-level system prompt and a system turn")
        messages.insert(0, {"role": "system", "content": system.strip()})
    if messages[-1]["role"] != "assistant":
        raise Skip("empty answer", "the conversation does not end with a reply")
    if any(not m["content"] for m in messages if m["role"] != "system"):
        raise Skip("empty answer", "a turn is empty")
    return [chat(record_id(obj, item, SOURCE, "id"), SOURCE, messages)]
