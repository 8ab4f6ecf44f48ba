"""`medtune serve RUN_OR_MERGED`: an OpenAI-compatible API and a chat page, in the run's training format.

    medtune serve runs/demo [--host 127.0.0.1] [--port 8000] [--api-key-env NAME] [--max-batch 8]

Binds to 127.0.0.1 unless told otherwise; binding anywhere else needs an API key (from an environment
variable, never from the command line, never logged). The page at / talks to the same API.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

import uvicorn

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.infer.generation import GenerationSettings, load_model_for_inference
from medtune.infer.serving.api import create_app
from medtune.infer.serving.engine import Engine
from medtune.model.load import DTYPES


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(host: str, env_name: str | None) -> str | None:
    """The key clients must send; required off loopback. The variable's value is read, never printed."""
    if env_name:
        key = os.environ.get(env_name, "")
        if not key:
            raise MedtuneError(f"--api-key-env {env_name}: the environment variable is not set (or empty)")
        return key
    if not is_loopback(host):
        raise MedtuneError(
            f"--host {host} is reachable from other machines: protect it with --api-key-env NAME "
            "(the key in that environment variable), or serve on 127.0.0.1"
        )
    return None


def build(args: argparse.Namespace):
    """The app and its engine, from the command line's settings (the tests build it the same way)."""
    api_key = api_key_for(args.host, args.api_key_env)
    if args.max_batch < 1 or args.max_queue < 1 or args.max_new_tokens < 1:
        raise MedtuneError("--max-batch, --max-queue and --max-new-tokens must be at least 1")
    limits = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.max_batch)
    loaded = load_model_for_inference(args.model, args.dtype, args.template)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.stop_ids, limits.batch_size, args.max_queue)
    name = args.name or os.path.basename(os.path.normpath(args.model))
    return create_app(loaded, engine, name, api_key, limits.max_new_tokens), loaded, engine


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medtune serve", description=__doc__.splitlines()[0])
    p.add_argument("model", help="run directory, merged model directory, or hub id / model path (then --template)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the API key clients send")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (1: no batching)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before the server answers 429")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--template", help="chat template, when the model does not record one")
    p.add_argument("--name", help="the model id clients see (default: the directory's name)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_libraries()

    def work() -> int:
        app, loaded, _ = build(args)
        where = f"http://{args.host}:{args.port}"
        print(f"serving {args.model} (template {loaded.template.name}) on {where}: chat page {where}/, API {where}/v1")
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
        return 0

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
