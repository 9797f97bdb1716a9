"""``bitserve bench``: an online load generator against a running bitserve server.

Requests go out as ``ChatStream`` calls on one ``grpc.aio`` channel from one event loop.
Arrivals follow a Poisson process at ``--request-rate`` (``inf``: all at once); at most
``--concurrency`` requests are in flight (an ``asyncio.Semaphore``). A sweep
(``--concurrency 1,16,64``) runs each level in turn, on fresh prompts.

Per request the client records: start (sent), the arrival time of every delta that carries
text or tokens (the first one gives TTFT; the gaps between consecutive ones are the ITLs; a
delta may carry more than one token, as in vLLM's benchmark), the end, the prompt and
output token counts of the end event's ``usage``, and the gRPC status code of a failure.

Metrics per level: duration (first send -> last end), completed, errors by code, req/s,
output tok/s, total tok/s (prompt + output), and mean / p50 / p90 / p99 in ms of
TTFT, TPOT = (e2e - ttft) / (output_tokens - 1) (requests with > 1 output token),
ITL and E2E latency.

Prompts (``--dataset``): ``synthetic`` (random common words, calibrated against the server
with two 1-token requests so the prompt is about ``--input-len`` tokens, chat template
included), ``demo`` (questions of :mod:`bitserve.demo.task`), or a file: one prompt per
line (``.txt``) or JSON lines with ``{"prompt": ...}`` or ``{"messages": [...]}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# grpc, numpy and the stubs are imported where used, so that building the CLI parser
# (which imports BenchConfig) stays fast.

__all__ = ["BenchConfig", "RequestRecord", "run_bench", "arun_bench", "summarize", "format_table",
           "write_json", "write_png", "parse_levels"]

PERCENTILES = (50, 90, 99)


@dataclass
class BenchConfig:
    address: str = field(default="localhost:50051", metadata={"help": "server address (default: localhost:50051)"})
    num_requests: int = field(default=64, metadata={"help": "requests per concurrency level"})
    concurrency: str | int | list[int] = field(
        default="1", metadata={"help": "most requests in flight, or a sweep run level by level: '1,16,64' "
                                       "(default: 1)"})
    request_rate: float = field(
        default=math.inf, metadata={"help": "arrivals per second (Poisson); inf sends all at once, bounded by "
                                            "--concurrency (default: inf)"})
    dataset: str = field(
        default="synthetic", metadata={"help": "'synthetic' (random words, --input-len tokens), 'demo' (demo task "
                                                "questions) or a file: .txt one prompt a line, .jsonl with "
                                                "{\"prompt\"} or {\"messages\"} (default: synthetic)"})
    input_len: int = field(default=64, metadata={"help": "prompt tokens of synthetic prompts, chat template included "
                                                         "(approximate; default: 64)"})
    max_tokens: int = field(default=64, metadata={"help": "output tokens per request (default: 64)"})
    output_len: int | None = field(default=None,
                                   metadata={"help": "same as --max-tokens (vLLM's name; default: unset)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (default: 0, greedy)"})
    ignore_eos: bool = field(default=True, metadata={"help": "generate max_tokens tokens whatever the model says "
                                                             "(default: on)"})
    model: str = field(default="", metadata={"help": "model name to request (default: the served model)"})
    tls: bool = field(default=False, metadata={"help": "use TLS (system roots, or --ca-cert) (default: off)"})
    ca_cert: str | None = field(default=None, metadata={"help": "PEM CA certificate for TLS (default: none)"})
    api_token: str | None = field(default=None, metadata={"help": "API token (default: $BITSERVE_API_TOKEN)"})
    seed: int = field(default=0, metadata={"help": "seed of prompts and arrival times (default: 0)"})
    warmup: int = field(default=1, metadata={"help": "requests sent (and not measured) before the first level "
                                                     "(default: 1)"})
    timeout: float = field(default=600.0, metadata={"help": "deadline of each request in seconds (default: 600)"})
    out_json: str | None = field(default=None,
                                 metadata={"help": "write all levels as JSON to this file (default: none)"})
    out_png: str | None = field(default=None, metadata={"help": "write a plot (tok/s, TTFT, TPOT vs concurrency) "
                                                               "to this PNG file (default: none)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (default: on)"})

    def __post_init__(self):
        if self.output_len is not None:
            self.max_tokens = self.output_len
        self.levels = parse_levels(self.concurrency)
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1; got {self.num_requests}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf for all at once); got {self.request_rate}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; got {self.max_tokens}")
        if self.input_len < 1:
            raise ValueError(f"input_len must be >= 1; got {self.input_len}")
        if self.warmup < 0 or self.timeout <= 0:
            raise ValueError("warmup must be >= 0 and timeout > 0")
        if self.dataset not in ("synthetic", "demo") and not Path(self.dataset).is_file():
            raise ValueError(f"dataset must be 'synthetic', 'demo' or an existing file; got {self.dataset!r}")
        for name in ("out_json", "out_png"):  # found out before the run, not after it
            path = getattr(self, name)
            if path and not (Path(path).parent.is_dir() and os.access(Path(path).parent, os.W_OK)):
                raise ValueError(f"{name}: cannot write {path} (its folder does not exist or is not writable)")
        if self.out_png and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("out_png: writing a PNG needs matplotlib (pip install 'bitserve[plot]')")


def parse_levels(value) -> list[int]:
    """Concurrency levels from 4, "4", "1,16,64" or [1, 16, 64] (also a list of such strings)."""
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    else:
        items = [p for v in value for p in (parse_levels(v) if isinstance(v, str) else [v])]
    try:
        levels = [int(v) for v in items]
    except ValueError:
        raise ValueError(f"concurrency must be an integer or a list like '1,16,64'; got {value!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"concurrency levels must be >= 1; got {value!r}")
    return levels


# -- prompts --------------------------------------------------------------------------------

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name president team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death experience effect "
    "class control care field development role effort rate heart drug show leader light voice wife police "
    "mind price report decision son view relationship town road arm difference value building action model "
    "season society tax director position player record paper space ground form event official matter center"
).split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def load_prompt_file(path: str) -> list[list[dict]]:
    """Chat messages of each prompt in a .txt (one a line) or .jsonl ({"prompt"} / {"messages"}) file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if not path.endswith((".jsonl", ".json")):
        return [_user(line) for line in lines]
    out = []
    for i, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON: {e}") from None
        if isinstance(item, dict) and isinstance(item.get("messages"), list):
            out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in item["messages"]])
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append(_user(item["prompt"]))
        else:
            raise ValueError(f'{path}:{i}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    return out


# -- one request ----------------------------------------------------------------------------

@dataclass
class RequestRecord:
    start: float = 0.0
    end: float = 0.0
    chunk_times: list = field(default_factory=list)  # arrival time of each delta with text or tokens
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # gRPC status code name (or FINISH_REASON_ERROR)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class _Client:
    def __init__(self, cfg: BenchConfig):
        import grpc

        from bitserve.rpc.client import channel_credentials, metadata, sampling_options
        from bitserve.v1 import chat_pb2 as pb
        from bitserve.v1 import chat_pb2_grpc

        self.grpc, self.pb, self.sampling_options = grpc, pb, sampling_options
        self.cfg = cfg
        if cfg.tls or cfg.ca_cert:
            self.channel = grpc.aio.secure_channel(cfg.address, channel_credentials(cfg.ca_cert))
        else:
            self.channel = grpc.aio.insecure_channel(cfg.address)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.metadata = metadata(cfg.api_token or os.environ.get("BITSERVE_API_TOKEN"))
        self.sampling = sampling_options(temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                         ignore_eos=cfg.ignore_eos)

    def request(self, messages: list[dict], sampling=None):
        pb = self.pb
        return pb.ChatRequest(model=self.cfg.model, sampling=sampling or self.sampling,
                              messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])

    async def model_info(self):
        try:
            return await self.stub.GetModelInfo(self.pb.GetModelInfoRequest(model=self.cfg.model),
                                                metadata=self.metadata, timeout=min(10.0, self.cfg.timeout),
                                                wait_for_ready=True)
        except self.grpc.aio.AioRpcError as e:
            raise OSError(f"cannot reach a bitserve server at {self.cfg.address}: {e.code().name}: "
                          f"{e.details()}") from None

    async def stream(self, request) -> RequestRecord:
        pb = self.pb
        rec = RequestRecord(start=time.perf_counter())
        try:
            call = self.stub.ChatStream(request, metadata=self.metadata, timeout=self.cfg.timeout)
            async for event in call:
                now = time.perf_counter()
                if event.HasField("delta"):
                    if event.delta.text or event.delta.token_ids:
                        rec.chunk_times.append(now)
                        rec.output_tokens += len(event.delta.token_ids)
                elif event.HasField("end"):
                    end = event.end
                    rec.prompt_tokens = end.usage.prompt_tokens
                    rec.output_tokens = end.usage.completion_tokens or rec.output_tokens
                    if end.finish_reason == pb.FINISH_REASON_ERROR:
                        rec.error, rec.detail = "FINISH_REASON_ERROR", end.error
                    elif end.finish_reason == pb.FINISH_REASON_ABORT:
                        rec.error, rec.detail = "FINISH_REASON_ABORT", end.error
        except self.grpc.aio.AioRpcError as e:
            rec.error, rec.detail = e.code().name, e.details() or ""
        rec.end = time.perf_counter()
        return rec

    async def prompt_tokens(self, text: str) -> int:
        one = self.sampling_options(temperature=0.0, max_tokens=1)
        rec = await self.stream(self.request(_user(text), one))
        if not rec.ok:
            raise OSError(f"calibration request failed: {rec.error}: {rec.detail}")
        return rec.prompt_tokens

    async def close(self) -> None:
        await self.channel.close()


async def _synthetic_prompts(client: _Client, cfg: BenchConfig, count: int) -> tuple[list[list[dict]], dict]:
    """``count`` random-word prompts of about cfg.input_len prompt tokens (measured on the server)."""
    rng = random.Random(f"bitserve-bench/{cfg.seed}")
    k = 8
    p1 = await client.prompt_tokens(_words(rng, 1))
    pk = await client.prompt_tokens(_words(rng, k + 1))
    per_word = max((pk - p1) / k, 1e-6)
    overhead = p1 - per_word
    num_words = max(1, round((cfg.input_len - overhead) / per_word))
    calib = {"template_tokens": round(overhead, 2), "tokens_per_word": round(per_word, 3), "words": num_words}
    return [_user(_words(rng, num_words)) for _ in range(count)], calib


async def _make_prompts(client: _Client, cfg: BenchConfig, count: int) -> tuple[list[list[dict]], dict]:
    if cfg.dataset == "synthetic":
        return await _synthetic_prompts(client, cfg, count)
    if cfg.dataset == "demo":
        from bitserve.demo.task import make_questions

        return [q.messages for q in make_questions(count, seed=cfg.seed)], {}
    prompts = load_prompt_file(cfg.dataset)
    return [prompts[i % len(prompts)] for i in range(count)], {"file_prompts": len(prompts)}


# -- one level ------------------------------------------------------------------------------

async def _run_level(client: _Client, cfg: BenchConfig, concurrency: int, prompts: list[list[dict]],
                     level_index: int) -> tuple[list[RequestRecord], float]:
    from tqdm.auto import tqdm

    rng = random.Random(f"bitserve-bench/arrivals/{cfg.seed}/{level_index}")
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        if math.isfinite(cfg.request_rate):
            t += rng.expovariate(cfg.request_rate)
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc=f"concurrency {concurrency}", unit="req", disable=not cfg.progress,
               file=sys.stderr, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()

    async def one(messages: list[dict], at: float) -> RequestRecord:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            rec = await client.stream(client.request(messages))
        bar.update(1)
        return rec

    try:
        records = await asyncio.gather(*(one(m, a) for m, a in zip(prompts, arrivals)))
    finally:
        bar.close()
    return list(records), time.perf_counter() - t0


def _stats_ms(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean())}
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES)):
        out[f"p{p}"] = float(v)
    return out


def summarize(records: list[RequestRecord], duration: float, concurrency: int) -> dict:
    """Metrics of one level (times in ms, rates per second of ``duration``)."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    first_error = next((f"{r.error}: {r.detail}" for r in records if not r.ok), None)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    duration = max(duration, 1e-9)
    return {
        "concurrency": concurrency,
        "num_requests": len(records),
        "duration_s": duration,
        "completed": len(ok),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "first_error": first_error,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "mean_input_tokens": in_tokens / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([g for r in ok for g in r.itls]),
        "e2e_ms": _stats_ms([r.e2e for r in ok]),
    }


# -- the whole run --------------------------------------------------------------------------

async def arun_bench(cfg: BenchConfig) -> dict:
    """Run every concurrency level of ``cfg`` against the server; returns the JSON-able result."""
    client = _Client(cfg)
    try:
        info = await client.model_info()
        total = cfg.warmup + cfg.num_requests * len(cfg.levels)
        prompts, calibration = await _make_prompts(client, cfg, total)
        warm, prompts = prompts[:cfg.warmup], prompts[cfg.warmup:]
        if warm:
            await asyncio.gather(*(client.stream(client.request(m)) for m in warm))
        levels = []
        for i, concurrency in enumerate(cfg.levels):
            level_prompts = prompts[i * cfg.num_requests:(i + 1) * cfg.num_requests]
            records, duration = await _run_level(client, cfg, concurrency, level_prompts, i)
            levels.append(summarize(records, duration, concurrency))
    finally:
        await client.close()
    config = dataclasses.asdict(cfg)
    config.pop("api_token", None)
    config["concurrency"] = cfg.levels
    config["request_rate"] = cfg.request_rate if math.isfinite(cfg.request_rate) else "inf"
    return {
        "config": config,
        "server": {"model": info.name, "format": info.format, "bits_per_weight": info.bits_per_weight,
                   "max_context": info.max_context, "kv_cache_dtype": info.kv_cache_dtype,
                   "kv_capacity_tokens": info.kv_capacity_tokens},
        "client": {"platform": platform.platform(), "python": platform.python_version(),
                   "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "prompts": calibration,
        "levels": levels,
    }


def run_bench(cfg: BenchConfig, write: bool = True) -> dict:
    """Blocking :func:`arun_bench` (its own event loop); also writes out_json / out_png when set
    (``write``; the CLI prints the table first, then calls :func:`write_results`)."""
    result = asyncio.run(arun_bench(cfg))
    if write:
        write_results(result, cfg)
    return result


def write_results(result: dict, cfg: BenchConfig) -> None:
    if cfg.out_json:
        write_json(result, cfg.out_json)
    if cfg.out_png:
        write_png(result, cfg.out_png)


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def write_png(result: dict, path: str) -> None:
    """Output tok/s and p50/p99 TTFT and TPOT vs concurrency (matplotlib, Agg backend)."""
    from bitserve.plotting import pyplot

    plt = pyplot()
    if plt is None:
        raise OSError("writing a PNG needs matplotlib (pip install 'bitserve[plot]')")

    levels = result["levels"]
    xs = [lv["concurrency"] for lv in levels]

    def series(metric: str, stat: str) -> list[float]:
        return [lv[metric][stat] if lv[metric][stat] is not None else float("nan") for lv in levels]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(xs, [lv["output_throughput"] for lv in levels], "o-", label="output tok/s")
    axes[0].set_title("output throughput")
    axes[0].set_ylabel("tokens / s")
    for ax, metric, title in ((axes[1], "ttft_ms", "TTFT"), (axes[2], "tpot_ms", "TPOT")):
        ax.plot(xs, series(metric, "p50"), "o-", label="p50")
        ax.plot(xs, series(metric, "p99"), "s--", label="p99")
        ax.set_title(title)
        ax.set_ylabel("ms")
        ax.legend()
    for ax in axes:
        ax.set_xlabel("concurrency")
        if len(set(xs)) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    server, cfg = result["server"], result["config"]
    fig.suptitle(f"bitserve bench: {server['model']} ({server['format']}), {cfg['dataset']}, "
                 f"max_tokens {cfg['max_tokens']}, rate {cfg['request_rate']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(result: dict) -> str:
    """A compact text table, one row per concurrency level (latencies in ms)."""
    def f(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    head = ("conc", "done", "err", "in", "out", "req/s", "out tok/s", "TTFT p50", "p90", "p99",
            "TPOT p50", "p90", "p99", "ITL p50", "p99", "E2E p50")
    rows = [head]
    for lv in result["levels"]:
        t, p, i, e = lv["ttft_ms"], lv["tpot_ms"], lv["itl_ms"], lv["e2e_ms"]
        rows.append((str(lv["concurrency"]), str(lv["completed"]), str(lv["errors"]),
                     f(lv["mean_input_tokens"], 0), f(lv["mean_output_tokens"], 0),
                     f(lv["request_throughput"], 2), f(lv["output_throughput"]),
                     f(t["p50"]), f(t["p90"]), f(t["p99"]), f(p["p50"]), f(p["p90"]), f(p["p99"]),
                     f(i["p50"]), f(i["p99"]), f(e["p50"], 0)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for lv in result["levels"]:
        if lv["errors"]:
            codes = ", ".join(f"{code} x{n}" for code, n in sorted(lv["errors_by_code"].items()))
            lines.append(f"concurrency {lv['concurrency']}: errors {codes}; first: {lv['first_error']}")
    return "\n".join(lines)
