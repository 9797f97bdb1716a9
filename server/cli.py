"""The ``bitserve`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bitserve.cli_args import add_dataclass_arguments, dataclass_from_args
from bitserve.config import EngineConfig, ModelLoadConfig, ReplicaConfig, ServerConfig
from bitserve.sampling_params import SamplingParams

# SamplingParams fields `bitserve chat` has no flag for: it shows one answer per turn, as text
CHAT_SKIPPED_SAMPLING = ("stop_token_ids", "ignore_eos", "seed", "logit_bias", "n", "logprobs")


def _build_parser() -> argparse.ArgumentParser:
    from bitserve import __version__

    parser = argparse.ArgumentParser(prog="bitserve", description="Serve extreme low-bit LLMs.")
    parser.add_argument("--version", action="version", version=f"bitserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over gRPC (default: the bundled demo model)")
    add_dataclass_arguments(serve, ModelLoadConfig)
    add_dataclass_arguments(serve, EngineConfig)
    add_dataclass_arguments(serve, ReplicaConfig)
    add_dataclass_arguments(serve, ServerConfig)
    serve.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    serve.set_defaults(func=_serve)

    chat = sub.add_parser("chat", help="chat with a running server (streaming REPL, piped lines, or one-shot -m)")
    chat.add_argument("--address", default="localhost:50051", help="server address (default: localhost:50051)")
    chat.add_argument("--tls", action="store_true", help="use TLS (system roots, or --ca-cert)")
    chat.add_argument("--ca-cert", help="PEM CA certificate for TLS")
    chat.add_argument("--api-token", help="API token (default: $BITSERVE_API_TOKEN)")
    chat.add_argument("--local", action="store_true",
                      help="no server: load the model in this process (the model flags below apply)")
    add_dataclass_arguments(chat, ModelLoadConfig)
    add_dataclass_arguments(chat, SamplingParams, skip=CHAT_SKIPPED_SAMPLING, defaults={"temperature": 0.0, "max_tokens": 64})
    chat.add_argument("-m", "--message", help="send one message, print the answer, exit")
    chat.add_argument("--system", help="system prompt for the conversation")
    chat.set_defaults(func=_chat)

    from bitserve.rpc.bench import BenchConfig  # light: grpc is imported when the bench runs

    bench = sub.add_parser("bench", help="load-test a running server (concurrency sweep or request rate); "
                                         "reports req/s, tok/s, TTFT/TPOT/ITL percentiles")
    add_dataclass_arguments(bench, BenchConfig)
    bench.set_defaults(func=_bench)

    from bitserve.convert_options import add_convert_arguments  # light: no torch

    convert = sub.add_parser("convert", help="convert a checkpoint to another bit format (dense llama -> bitnet, "
                                             "onebit, fbi, dual_binary; bitnet -> dual_binary, dense, GGUF)")
    add_convert_arguments(convert)
    convert.set_defaults(func=_convert)

    inspect = sub.add_parser("inspect", help="detected format, architecture, parameter counts, bits per weight, "
                                             "weight bytes and KV bytes per token of a checkpoint")
    inspect.add_argument("path", nargs="?", default="",
                         help="checkpoint folder or .gguf file (default, or 'demo': the bundled demo model)")
    inspect.add_argument("--load", action="store_true", help="also build the model on the CPU and report it")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=_inspect)
    return parser


def _convert(args: argparse.Namespace) -> int:
    from bitserve.converters import run_convert

    return run_convert(args)


def _inspect(args: argparse.Namespace) -> int:
    from bitserve.inspect_model import run_inspect

    return run_inspect(args)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from bitserve.app import build_app
    from bitserve.metrics import Metrics
    from bitserve.rpc.server import RpcServer, run_until_signalled

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load = dataclass_from_args(ModelLoadConfig, args)
    engine = dataclass_from_args(EngineConfig, args)
    replica_cfg = dataclass_from_args(ReplicaConfig, args)
    server_cfg = dataclass_from_args(ServerConfig, args)
    server_cfg.check_files()
    where = f" on {replica_cfg.replicas} Ray replica(s)" if replica_cfg.uses_ray else ""
    print(f"loading {load.model or 'the bundled demo model'}{where} ...", file=sys.stderr, flush=True)
    metrics_box: list = []
    app = build_app(load, engine, server_cfg.served_model_name,
                    on_finish=lambda final: metrics_box[0].observe_finished(final) if metrics_box else None,
                    replica_cfg=replica_cfg)
    metrics = Metrics.for_replica(app.info, app.replica)
    metrics_box.append(metrics)
    info = app.info
    metrics_port = metrics.serve_http(server_cfg.host, server_cfg.metrics_port) if server_cfg.metrics_port >= 0 else None

    def ready(port: int) -> None:
        from bitserve.heap import freeze_startup_heap

        frozen = freeze_startup_heap()  # warm: what lives now lives as long as the server
        logging.getLogger("bitserve.serve").debug("froze %d start-up objects out of garbage collection", frozen)
        scheme = "grpcs" if server_cfg.tls_cert else "grpc"
        print(f"serving '{info.name}' ({info.format}, {info.bits_per_weight:.2f} bits/weight, "
              f"{info.weight_bytes / 1e6:.1f} MB weights, KV {info.kv_cache_dtype} "
              f"{info.kv_capacity_tokens} tokens{where}) on {scheme}://{server_cfg.host}:{port}", file=sys.stderr)
        if metrics_port is not None:
            print(f"metrics on http://{server_cfg.host}:{metrics_port}/metrics", file=sys.stderr)
        print(f"try: bitserve chat --address localhost:{port}    (Ctrl-C drains and stops)", file=sys.stderr,
              flush=True)

    async def run() -> None:
        # grpc.aio objects bind to the running loop: build the server inside it
        await run_until_signalled(RpcServer(app, server_cfg, metrics), on_ready=ready)

    try:
        asyncio.run(run())
    finally:
        metrics.close()
        app.shutdown()  # a no-op after a drain; stops the engines (and Ray replicas) if the server failed
    return 0


REPL_HINT = " /reset clears the history, /exit quits."


def _local_answerer(args: argparse.Namespace, hint: str):
    from bitserve.llm import LLM

    load = dataclass_from_args(ModelLoadConfig, args)
    params = dataclass_from_args(SamplingParams, args, seed=None)
    print(f"loading {load.model or 'the bundled demo model'} ...", file=sys.stderr)
    llm = LLM(**vars(load))
    print(f"ready: {llm.loaded.path.name} ({llm.loaded.plugin.name}, in-process).{hint}", file=sys.stderr)

    def answer(history: list[dict], interactive: bool) -> str:
        text = llm.chat(history, params)[0].text
        print(f"bitserve> {text}" if interactive else text, flush=True)
        return text

    return answer


def _local_only_flags(args: argparse.Namespace) -> list[str]:
    """The model-loading flags given on the command line (they apply only with --local)."""
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(ModelLoadConfig)
            if hasattr(args, f.name) and getattr(args, f.name) != f.default]


def _remote_answerer(args: argparse.Namespace, hint: str):
    import os

    from bitserve.rpc.client import ChatClient, ServerError, sampling_options

    client = ChatClient(args.address, tls=args.tls, ca_cert=args.ca_cert,
                        api_token=args.api_token or os.environ.get("BITSERVE_API_TOKEN"))
    try:
        info = client.model_info()
    except ServerError as e:
        if e.code == "UNAUTHENTICATED":
            raise OSError(f"the server at {args.address} refused the API token: {e.details} "
                          "(pass --api-token or set $BITSERVE_API_TOKEN)") from None
        raise OSError(f"cannot reach a bitserve server at {args.address}: {e} "
                      f"(start one with 'bitserve serve', or use --local)") from None
    ignored = _local_only_flags(args)
    if ignored:
        print(f"note: ignored without --local: {', '.join(ignored)} (the server at {args.address} serves its "
              f"own model)", file=sys.stderr)
    print(f"connected to {args.address}: '{info.name}' ({info.format}, {info.bits_per_weight:.2f} bits/weight)."
          f"{hint}", file=sys.stderr)
    params = dataclass_from_args(SamplingParams, args, seed=None)  # the same checks as --local
    sampling = sampling_options(**{f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams)
                                   if f.name not in CHAT_SKIPPED_SAMPLING})

    def answer(history: list[dict], interactive: bool) -> str:
        parts = []
        if interactive:
            print("bitserve> ", end="", flush=True)
        try:
            for event in client.stream_chat(history, sampling):
                if event.HasField("delta"):
                    parts.append(event.delta.text)
                    print(event.delta.text, end="", flush=True)
        except ServerError as e:
            print(file=sys.stdout)
            raise ValueError(str(e)) from None
        print(flush=True)
        return "".join(parts)

    return answer


def _chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty() and args.message is None
    hint = REPL_HINT if args.message is None else ""
    answer_fn = _local_answerer(args, hint) if args.local else _remote_answerer(args, hint)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        reply = answer_fn(history, interactive)
        history.append({"role": "assistant", "content": reply})
        return reply

    if args.message is not None:
        answer(args.message)
        return 0
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
            answer(line)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e} (use /reset)", file=sys.stderr)
            history.pop()


def _bench(args: argparse.Namespace) -> int:
    from bitserve.rpc.bench import BenchConfig, format_table, run_bench, write_results

    cfg = dataclass_from_args(BenchConfig, args)
    rate = "all at once" if cfg.request_rate == float("inf") else f"{cfg.request_rate:g} req/s (Poisson)"
    print(f"bench {cfg.address}: {cfg.num_requests} requests per level, concurrency {cfg.levels}, arrivals {rate}, "
          f"dataset {cfg.dataset}, max_tokens {cfg.max_tokens}", file=sys.stderr, flush=True)
    result = run_bench(cfg, write=False)
    server = result["server"]
    print(f"model '{server['model']}' ({server['format']}, {server['bits_per_weight']:.2f} bits/weight); "
          f"latencies in ms, 'in'/'out' = mean prompt/output tokens")
    print(format_table(result), flush=True)  # before the files: a failed write does not lose the results
    write_results(result, cfg)
    for path in (cfg.out_json, cfg.out_png):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    return 0 if any(level["completed"] for level in result["levels"]) else 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise into a closed pipe again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured output)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left (`bitserve inspect --json | head -1`): not an error of ours
        _quiet_stdout()
        return 0
    except (ValueError, OSError) as e:
        parser.exit(2, f"bitserve: error: {e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
