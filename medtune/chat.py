"""`medtune chat MODEL_OR_RUN_DIR`: a terminal conversation with the training template, history kept."""

from __future__ import annotations

import argparse
import sys

from medtune.model import DTYPES
from medtune.predict import generate_batch, load_model_for_inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune chat", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run directory, merged model directory, or hub id / model path")
    parser.add_argument("--template", help="chat template, when the model does not record one")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    loaded = load_model_for_inference(args.model, args.dtype, args.template)
    messages: list[dict[str, str]] = []
    print("medtune chat: type a message; /reset clears the history; an empty line or Ctrl-D quits.")
    for line in sys.stdin:
        text = line.strip()
        if not text:
            break
        if text == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        reply = generate_batch(loaded, [{"messages": messages}], args.max_new_tokens,
                               do_sample=False, temperature=1.0, top_p=1.0)[0]
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0
