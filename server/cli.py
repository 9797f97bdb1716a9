"""The ``bitserve`` command line."""

from __future__ import annotations

import argparse
import sys

from bitserve.cli_args import add_dataclass_arguments, dataclass_from_args
from bitserve.config import ModelLoadConfig
from bitserve.sampling_params import SamplingParams


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitserve", description="Serve extreme low-bit LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model in-process (interactive, piped lines, or one-shot -m)")
    add_dataclass_arguments(chat, ModelLoadConfig)
    add_dataclass_arguments(chat, SamplingParams, skip=("stop_token_ids", "ignore_eos", "seed", "logit_bias"),
                            defaults={"temperature": 0.0, "max_tokens": 64})
    chat.add_argument("-m", "--message", help="send one message, print the answer, exit")
    chat.add_argument("--system", help="system prompt for the conversation")
    chat.set_defaults(func=_chat)
    return parser


def _chat(args: argparse.Namespace) -> int:
    from bitserve.llm import LLM

    load = dataclass_from_args(ModelLoadConfig, args)
    params = dataclass_from_args(SamplingParams, args, seed=None)
    print(f"loading {load.model or 'the bundled demo model'} ...", file=sys.stderr)
    llm = LLM(**{k: v for k, v in vars(load).items()})
    fmt = llm.loaded.plugin.name
    print(f"ready: {llm.loaded.path.name} ({fmt}, {llm.loaded.weight_bytes / 1e6:.1f} MB of weights, "
          f"{llm.max_model_len} tokens of context). /reset clears the history, /exit quits.", file=sys.stderr)

    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        out = llm.chat(history, params)[0]
        history.append({"role": "assistant", "content": out.text})
        return out.text

    if args.message is not None:
        print(answer(args.message))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history[:] = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        try:
            reply = answer(line)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e} (use /reset)", file=sys.stderr)
            history.pop()
            continue
        print(f"bitserve> {reply}" if interactive else reply, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        parser.exit(2, f"bitserve: error: {e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
