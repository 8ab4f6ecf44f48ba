"""Where cold tokenization of chatmed rows goes, in one process on one thread: the tokenizer's own encoding of
the joined prompt + reply texts, of the prompts alone (encoded again for the label mask: PromptCBLUE masks
the first len(tokenizer(prompt)) labels), and everything else medtune does (JSON, validation, templates, ids
into Python lists, Arrow).

    python benchmarks/tokenize_profile.py TOKENIZER_DIR [--rows 50000]

The first two are timed by calling the tokenizer directly (the fast tokenizer's Rust encode_batch_fast, or
sentencepiece's batch encoder), the third is the rest of medtune's data.tokenize_workers: 1 cold build.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import chatmed_like, write_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer")
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MEDTUNE_CACHE"] = str(tmp / "cache")
        from medtune.data.token_cache import load_datasets
        from medtune.data.tokenizer import encode_texts, load_tokenizer, use_one_thread
        from medtune.recipe import DataConfig

        use_one_thread()
        records = chatmed_like(args.rows)
        data = write_jsonl(records, tmp / "data.jsonl")
        tokenizer = load_tokenizer(args.tokenizer)
        prompts = [f"问：\n{r['messages'][0]['content']}\n答：\n" for r in records]
        joined = [p + r["messages"][1]["content"] + "\n" for p, r in zip(prompts, records, strict=True)]

        def seconds(work) -> float:
            start = time.perf_counter()
            work()
            return time.perf_counter() - start

        texts = min(seconds(lambda: encode_texts(tokenizer, joined)) for _ in range(2))
        masks = min(seconds(lambda: encode_texts(tokenizer, prompts)) for _ in range(2))
        config = DataConfig(train_files=[str(data)], template="chatmed", max_length=1024, tokenize_workers=1)
        total = seconds(lambda: load_datasets(config, 42, tokenizer, log=lambda message: None))
        rest = total - texts - masks
        print(
            f"{args.rows:,} rows, {type(tokenizer).__name__}, one process, one thread: "
            f"cold tokenization {total:.2f} s = "
            f"the joined texts' encoding {texts:.2f} s ({texts / total:.0%}) + the prompts' again, for the mask "
            f"{masks:.2f} s ({masks / total:.0%}) + the rest {rest:.2f} s ({rest / total:.0%})"
        )


if __name__ == "__main__":
    main()
