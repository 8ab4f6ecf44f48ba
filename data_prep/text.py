"""Raw medical text for continued pre-training: `.txt` paragraphs or JSON lines {"text"}."""

from collections.abc import Iterator
from pathlib import Path

from data_prep.pipeline import Item, Options, Skip, read_items, record_id

SOURCE = "text"


def read_text_or_jsonl(path: Path) -> Iterator[Item]:
    """`.txt`/`.md` (any case): one item per paragraph (blank-line separated); anything else: JSON lines / array."""
    if path.suffix.lower() not in (".txt", ".md", ".text"):
        yield from read_items(path)
        return
    index, start, lines = 0, 1, []
    with path.open(encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                if not lines:
                    start = lineno
                lines.append(line.rstrip("\n"))
            elif lines:
                yield Item(str(path), index, start, {"text": "\n".join(lines)})
                index, lines = index + 1, []
    if lines:
        yield Item(str(path), index, start, {"text": "\n".join(lines)})


def convert(obj: dict, item: Item, options: Options) -> list[dict]:
    text = obj.get("text", obj.get("content"))
    if not isinstance(text, str):
        raise Skip("missing field", "'text'")
    if not text.strip():
        raise Skip("empty text")
    return [{"id": record_id(obj, item, SOURCE, "id"), "source": SOURCE, "text": text.strip()}]
