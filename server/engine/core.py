"""The synchronous, token-level engine: requests in, token deltas out, one step at a time.

No threads, asyncio, grpc, ray or prometheus here. Text (tokenizing,
detokenizing, stop strings, ``n`` fan-out) belongs to the front end
(:mod:`bitserve.engine.llm_engine`, :mod:`bitserve.engine.async_engine`).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import torch

from bitserve.config import EngineConfig
from bitserve.engine.block_manager import BlockManager
from bitserve.engine.cuda_graphs import CudaGraphCapture, DecodeGraphs, GraphCapture
from bitserve.engine.limits import EngineLimits
from bitserve.engine.kv_cache import KVCacheSpec, PagedKVCache, canonical_kv_dtype, default_block_size
from bitserve.engine.model_runner import ModelRunner
from bitserve.engine.piecewise_graphs import CudaPiecewiseCapture, PiecewiseCapture, PiecewiseGraphs
from bitserve.engine.request import FinishReason, Request, Timings
from bitserve.engine.sampler import Sampler, SampleResult, SamplingState, make_generator
from bitserve.engine.scheduler import Scheduler
from bitserve.model import LlamaForCausalLM
from bitserve.kernels import kv_dispatch
from bitserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_CPU_DEFAULT_KV_CAP = 2 << 30


@dataclass
class EngineRequest:
    """What the front end submits: token ids and how to sample them (one of n samples)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    sample_index: int = 0


@dataclass(slots=True)
class TokenDelta:
    """New tokens of one request from one step; the last one carries the finish reason."""

    request_id: str
    token_ids: list[int]
    samples: list[SampleResult] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    timings: Timings | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def followed_by(self, *later: TokenDelta) -> TokenDelta:
        """One delta with this one's tokens, then each of ``later``'s in order (the last one's finish and
        counts are the newest); the token and sample lists are joined once, however many follow."""
        if not later:
            return self
        last = later[-1]
        token_ids, samples = list(self.token_ids), list(self.samples)
        timings = self.timings
        for d in later:
            token_ids.extend(d.token_ids)
            samples.extend(d.samples)
            if d.timings is not None:
                timings = d.timings
        return TokenDelta(self.request_id, token_ids, samples, last.finish_reason, last.stop_reason,
                          last.num_prompt_tokens, last.num_cached_tokens, timings)


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    kv_bytes_per_token: int = 0
    kv_capacity_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    cuda_graph_steps: int = 0  # of those, steps replayed from CUDA graphs (decode or piecewise)
    piecewise_graph_steps: int = 0  # of those, mixed/prefill steps replayed from piecewise CUDA graphs


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device for the block (Triton launches and CUDA graphs go to
    the current device, and the engine may run on another thread or on ``cuda:N``); a no-op on CPUs."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def plan_num_blocks(spec: KVCacheSpec, cfg: EngineConfig, max_model_len: int, device: torch.device) -> int:
    """How many KV blocks fit the budget for the chosen KV dtype (``bytes_per_block`` with
    scales; the int4/int2 staging pool is taken off the budget first)."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if cfg.kv_cache_memory_mb is not None:
        budget = cfg.kv_cache_memory_mb << 20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cfg.gpu_memory_utilization)
    else:
        budget = min(cfg.max_num_seqs * max_model_len * spec.bytes_per_token + spec.stage_bytes, _CPU_DEFAULT_KV_CAP)
    blocks = spec.num_blocks_for(budget)
    if blocks < 1:
        raise ValueError(f"the KV-cache budget of {budget} bytes holds no block of {spec.bytes_per_block} bytes "
                         f"(after {spec.stage_bytes} bytes of staging)")
    return blocks


class EngineCore:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        *,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        default_seed: int = 0,
        graph_capture: GraphCapture | None = None,
        piecewise_capture: PiecewiseCapture | None = None,
    ):
        """``graph_capture``: how decode steps are captured and replayed (default: CUDA graphs on a
        CUDA device, none elsewhere; ``config.enforce_eager`` turns them off). ``piecewise_capture``:
        the same for mixed and prefill steps of up to ``config.piecewise_graph_tokens`` tokens
        (default: CUDA graphs split at the attention calls, on a CUDA device)."""
        cfg = model.config
        device = model.model.norm.weight.device
        self.config = config
        self.max_model_len = max_model_len
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.default_seed = default_seed
        # requests that set no seed each get one from this stream: their samples differ from one
        # another (as vLLM's global RNG makes them), and a run from a fresh start repeats
        self._unseeded = random.Random(default_seed)
        kv_dtype = canonical_kv_dtype(config.kv_cache_dtype, model.dtype)
        want_graphs = not config.enforce_eager and (graph_capture is not None or device.type == "cuda")
        block_size = config.block_size or default_block_size(kv_dtype)
        self.spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, kv_dtype,
                                stage_dtype=str(model.dtype).replace("torch.", ""),
                                # one more for the decode graphs' padding rows
                                num_stage_slots=(config.max_num_seqs + int(want_graphs) if kv_dtype in ("int4", "int2")
                                                 else 0),
                                pre_rope_keys=config.kv_pre_rope_keys, sink_tokens=config.kv_sink_tokens)
        num_blocks = plan_num_blocks(self.spec, config, max_model_len, device)
        rope = None
        if self.spec.pre_rope_keys:
            rope = model.model.rope.cos_sin(torch.arange(max_model_len, device=device), torch.float32)
        self.kv_cache = PagedKVCache(self.spec, num_blocks, device, rope)
        self.runner = ModelRunner(model, self.kv_cache)
        if want_graphs:
            # the last block is the graphs' scratch block: the block manager never sees it
            with on_device(device):
                num_blocks -= self._capture_graphs(model, graph_capture, num_blocks, max_model_len)
        if (config.piecewise_graph_tokens and not config.enforce_eager
                and (piecewise_capture is not None or device.type == "cuda")):
            with on_device(device):
                self._capture_piecewise(model, piecewise_capture)
        self.blocks = BlockManager(num_blocks, block_size, config.enable_prefix_caching,
                                   on_free=self.kv_cache.free_block)
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_queue=config.max_queue,
            max_model_len=max_model_len,
            policy=config.scheduling_policy,
        )
        self.sampler = Sampler()
        self._states: dict[str, SamplingState] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._steps = 0

    def _capture_graphs(self, model: LlamaForCausalLM, capture: GraphCapture | None, num_blocks: int,
                        max_model_len: int) -> int:
        """Capture the decode graphs (:mod:`bitserve.engine.cuda_graphs`); returns the KV blocks
        they keep (1: the scratch block), 0 when the step cannot be captured (logged)."""
        why = None
        if num_blocks < 2:
            why = "the KV cache has a single block (the graphs need one of their own)"
        elif capture is None:
            probe = torch.empty(1, model.config.num_heads, model.config.head_dim, dtype=model.dtype,
                                device=self.kv_cache.layout.k.device)
            if not kv_dispatch.attention_graph_safe(probe, self.kv_cache.layout.layer(0)):
                why = "the attention of this KV layout runs the plain-torch twin"
            else:
                capture = CudaGraphCapture(probe.device)
        if why is not None:
            log.info("decode steps run eagerly: %s", why)
            return 0
        try:
            graphs = DecodeGraphs(model, self.kv_cache, scratch_block=num_blocks - 1,
                                  max_batch=self.config.max_num_seqs, max_model_len=max_model_len, capture=capture)
            graphs.capture_all()
        except Exception as exc:  # noqa: BLE001 -- e.g. a third-party plugin that syncs with the host
            log.warning("decode steps run eagerly: capturing them as CUDA graphs failed: %s: %s",
                        type(exc).__name__, exc)
            if self.kv_cache.layout.k.is_cuda:
                torch.cuda.synchronize()
            return 0
        self.runner.graphs = graphs
        return 1

    def _capture_piecewise(self, model: LlamaForCausalLM, capture: PiecewiseCapture | None) -> None:
        """Capture the piecewise graphs of mixed and prefill steps
        (:mod:`bitserve.engine.piecewise_graphs`); log and run those steps eagerly if that fails."""
        if capture is None:
            decode = self.runner.graphs
            pool = getattr(decode.capture, "pool", None) if decode is not None else None
            capture = CudaPiecewiseCapture(model.model.norm.weight.device, pool)  # one pool for all graphs
        max_tokens = min(self.config.piecewise_graph_tokens, self.config.max_num_batched_tokens)
        try:
            graphs = PiecewiseGraphs(model, max_tokens=max_tokens, capture=capture)
            graphs.capture_all()
        except Exception as exc:  # noqa: BLE001 -- e.g. a third-party plugin that syncs with the host
            log.warning("mixed and prefill steps run eagerly: capturing them as piecewise CUDA graphs failed: "
                        "%s: %s", type(exc).__name__, exc)
            if model.model.norm.weight.is_cuda:
                torch.cuda.synchronize()
            return
        self.runner.piecewise = graphs

    # -- requests ---------------------------------------------------------------------
    def validate(self, req: EngineRequest) -> None:
        """Raise ValueError (naming the problem) for a request this engine can never serve."""
        EngineLimits.of(self).validate(req)

    def add_request(self, req: EngineRequest) -> None:
        self.validate(req)
        request = Request(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            params=req.params,
            eos_token_ids=self.eos_token_ids,
            priority=req.priority,
            cache_salt=req.cache_salt,
        )
        self.scheduler.add(request)
        generator = None
        if not req.params.greedy:
            seed = req.params.seed if req.params.seed is not None else self._unseeded.getrandbits(64)
            generator = make_generator(seed, self.default_seed, req.sample_index)
        self._states[req.request_id] = SamplingState(
            params=req.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            generator=generator,
            eos_token_ids=self.eos_token_ids,
        )

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
              stop_reason: int | str | None = None) -> TokenDelta | None:
        """Finish a request now and free its blocks; returns its final delta (None if unknown)."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        req.finish_reason, req.stop_reason = reason, stop_reason
        self._release(request_id)
        return self._final_delta(req, [], [])

    def _release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self.sampler.release(state)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ---------------------------------------------------------------------
    def step(self) -> list[TokenDelta]:
        out = self.scheduler.schedule()
        if not out.chunks:
            return []
        with on_device(self.runner.device):
            logits = self.runner.execute(out.chunks)
            sampling = [c for c in out.chunks if c.samples]
            results = self.sampler(logits, [self._states[c.request.request_id] for c in sampling]) if sampling else []
        self._steps += 1
        scheduler = self.scheduler
        for chunk in out.chunks:  # before the sampled tokens are appended (prefix-cache hashes)
            scheduler.advance(chunk)
        now = time.monotonic()
        self._generation_tokens += len(results)
        deltas = []
        for chunk, result in zip(sampling, results):
            req = chunk.request
            token = result.token_id
            req.output_token_ids.append(token)
            timings = req.timings
            if timings.first_token is None:  # its prefill is complete: count its prompt (once, like vLLM)
                timings.first_token = now
                self._prompt_tokens += len(req.prompt_token_ids)
            timings.last_token = now
            stop = scheduler.check_stop(req, token)
            if stop is None:  # (timings too: the front end may end it on a stop string)
                deltas.append(TokenDelta(req.request_id, [token], [result], None, None, len(req.prompt_token_ids),
                                         req.num_cached_tokens, timings))
            else:
                scheduler.finish(req, *stop)
                self._release(req.request_id)
                deltas.append(self._final_delta(req, [token], [result]))
        return deltas

    @staticmethod
    def _final_delta(req: Request, tokens: list[int], samples: list[SampleResult]) -> TokenDelta:
        return TokenDelta(req.request_id, tokens, samples, req.finish_reason, req.stop_reason,
                          req.num_prompt_tokens, req.num_cached_tokens, req.timings)

    # -- observability ------------------------------------------------------------------
    def stats(self) -> EngineStats:
        running = len(self.scheduler.running)  # the scheduler keeps only RUNNING requests there
        return EngineStats(
            num_running=running,
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.blocks.usage,
            num_kv_blocks=self.blocks.num_blocks,
            num_free_kv_blocks=self.blocks.num_free_blocks,
            kv_bytes_per_token=self.spec.bytes_per_token,
            kv_capacity_tokens=self.blocks.num_blocks * self.spec.block_size,
            prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            steps=self._steps,
            cuda_graph_steps=sum(g.num_replays for g in (self.runner.graphs, self.runner.piecewise) if g is not None),
            piecewise_graph_steps=self.runner.piecewise.num_replays if self.runner.piecewise is not None else 0,
        )
