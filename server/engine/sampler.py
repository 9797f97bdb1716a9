"""Batched next-token sampler with vLLM v1's parameters and processing order.

Per row (one sequence that samples this step), in this order:

1. ``logit_bias`` is added; while ``len(output_token_ids) < min_tokens`` the
   stop token ids and (unless ``ignore_eos``) the eos ids are set to -inf.
2. Penalties (vLLM semantics): ``repetition_penalty`` on every token seen in
   the prompt or the output (positive logits divided, negative multiplied);
   ``frequency_penalty * count`` and ``presence_penalty * (count > 0)``
   subtracted, counts taken over the OUTPUT tokens only.
3. Greedy rows (``params.greedy``) take the argmax (ties: lowest token id).
   Other rows: divide by temperature -> ``min_p`` -> ``top_k`` (ties with the
   k-th logit are kept) -> ``top_p`` (smallest most-likely set whose mass
   reaches top_p, computed after top_k) -> sample.

Sampling draws exactly one float64 uniform per sampled step from the row's own
generator and inverts the row's CDF (token-id order), so a row's token depends
only on its logits and its generator, never on the other rows of the batch
(batch invariance) nor on the device the logits live on.

Logprobs (``params.logprobs`` not None) are vLLM v1's default
``raw_logprobs``: ``log_softmax`` of the raw logits as given, before bias,
min_tokens masking, penalties and temperature. ``SampleResult.logprob`` is the
sampled token's; ``top_logprobs`` the ``params.logprobs`` best (id, logprob),
descending, ties by lower id (empty for logprobs=0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bitserve.engine.penalty_table import PenaltyRow, PenaltyTable
from bitserve.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingState:
    """What the sampler needs to know about one sequence; owned by the engine.

    The engine appends each sampled token to ``output_token_ids`` before the
    next step (penalties and min_tokens read it).
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # None for greedy
    eos_token_ids: frozenset[int] = frozenset()
    penalty_row: PenaltyRow | None = None  # the sampler's (penalty_table.py); set on first use


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # raw logprob of the sampled token (None unless params.logprobs is set)
    top_logprobs: list[tuple[int, float]] | None = None  # params.logprobs best (id, raw logprob), descending


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int | None, default_seed: int, sample_index: int = 0) -> int:
    """The 64-bit seed of sample ``sample_index`` of a request.

    Sample 0 uses ``seed`` itself (``default_seed`` when there is none; the engine
    gives every request that sets no seed its own),
    so n=1 matches ``torch.Generator().manual_seed(seed)``; sample i > 0 uses a
    splitmix64 hash of (seed, i), so the streams of one request are distinct
    and do not coincide with another request's ``seed + i``.
    """
    base = (default_seed if seed is None else seed) & _MASK64
    if sample_index == 0:
        return base
    return _splitmix64(_splitmix64(base) ^ (sample_index & _MASK64))


def make_generator(seed: int | None, default_seed: int, sample_index: int = 0) -> torch.Generator:
    """A CPU generator for one sample of one request (see :func:`derive_seed`).

    CPU is deliberate: the sampler draws one number per step from it, whatever
    device the logits are on, so results do not depend on the device's RNG.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, default_seed, sample_index))
    return gen


def _draw_uniform(gen: torch.Generator | None) -> float:
    if gen is None:  # no per-request generator: torch's global RNG (not reproducible per request)
        return float(torch.rand((), dtype=torch.float64))
    return float(torch.rand((), dtype=torch.float64, generator=gen, device=gen.device))


class Sampler:
    """``Sampler()(logits [B, V] float32, states) -> [SampleResult] * B``.

    Keeps the penalties' token counts between steps (:mod:`bitserve.engine.penalty_table`): call
    :meth:`release` with a state whose sequence ended.
    """

    def __init__(self) -> None:
        self.penalties = PenaltyTable()

    def release(self, state: SamplingState) -> None:
        """Forget a finished sequence (frees its penalty row, if it had one)."""
        self.penalties.release(state)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> list[SampleResult]:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [len(states)={len(states)}, vocab], got {tuple(logits.shape)}")
        B, V = logits.shape
        if B == 0:
            return []
        device = logits.device
        raw = logits.float()
        x = self.apply_processors(raw, states)

        greedy_rows = [i for i, s in enumerate(states) if s.params.greedy]
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if not random_rows:  # the common cases take the whole batch without copying rows out
            tokens = torch.argmax(x, dim=-1)
        elif not greedy_rows:
            tokens = self._sample(x, states)
        else:
            tokens = torch.empty(B, dtype=torch.long, device=device)
            g = torch.tensor(greedy_rows, device=device)
            tokens[g] = torch.argmax(x[g], dim=-1)
            r = torch.tensor(random_rows, device=device)
            tokens[r] = self._sample(x[r], [states[i] for i in random_rows])

        lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        token_list = tokens.tolist()
        results = [SampleResult(t) for t in token_list]
        if lp_rows:
            self._logprobs(raw, lp_rows, tokens, states, results)
        return results

    # -- processing -----------------------------------------------------------------
    def apply_processors(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Steps 1-2 (logit_bias, min_tokens, penalties) on a float32 copy of ``logits``.

        These are what greedy rows take the argmax of.
        """
        if not any(self._processes(s) for s in states):
            return logits.float()  # nothing to change: no copy of batch x vocab floats
        x = logits.float().clone()
        self._apply_bias_and_min_tokens(x, states)
        self._apply_penalties(x, states)
        return x

    @staticmethod
    def _processes(s: SamplingState) -> bool:
        """Whether steps 1-2 change this row's logits."""
        p = s.params
        return bool(p.logit_bias or (len(s.output_token_ids) < p.min_tokens and (p.stop_token_ids or not p.ignore_eos))
                    or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)

    @staticmethod
    def _apply_bias_and_min_tokens(x: torch.Tensor, states: list[SamplingState]) -> None:
        V = x.shape[1]
        rows, cols, vals = [], [], []
        mrows, mcols = [], []
        for i, s in enumerate(states):
            p = s.params
            for tok, bias in p.logit_bias.items():
                if tok >= V:
                    raise ValueError(f"logit_bias token id {tok} is outside the vocabulary ({V} tokens)")
                rows.append(i)
                cols.append(tok)
                vals.append(bias)
            if len(s.output_token_ids) < p.min_tokens:
                masked = set(p.stop_token_ids)
                if not p.ignore_eos:
                    masked |= set(s.eos_token_ids)
                for tok in masked:
                    if 0 <= tok < V:
                        mrows.append(i)
                        mcols.append(tok)
        if rows:
            idx = (torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device))
            x.index_put_(idx, torch.tensor(vals, dtype=x.dtype, device=x.device), accumulate=True)
        if mrows:
            idx = (torch.tensor(mrows, device=x.device), torch.tensor(mcols, device=x.device))
            x.index_put_(idx, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))

    def _apply_penalties(self, x: torch.Tensor, states: list[SamplingState]) -> None:
        rows = [i for i, s in enumerate(states)
                if s.params.repetition_penalty != 1.0 or s.params.presence_penalty != 0.0
                or s.params.frequency_penalty != 0.0]
        if not rows:
            return
        device = x.device
        counts, seen_prompt = self.penalties.gather([states[i] for i in rows], x.shape[1], device)
        out_counts = counts.to(x.dtype)
        rep = torch.tensor([states[i].params.repetition_penalty for i in rows], dtype=x.dtype, device=device)
        freq = torch.tensor([states[i].params.frequency_penalty for i in rows], dtype=x.dtype, device=device)
        pres = torch.tensor([states[i].params.presence_penalty for i in rows], dtype=x.dtype, device=device)

        r = torch.tensor(rows, device=device)
        sub = x[r]
        in_output = out_counts > 0
        rep_full = torch.where(seen_prompt | in_output, rep[:, None], torch.ones_like(sub))
        sub = torch.where(sub > 0, sub / rep_full, sub * rep_full)
        sub = sub - freq[:, None] * out_counts
        sub = sub - pres[:, None] * in_output.to(x.dtype)
        x[r] = sub

    @staticmethod
    def _sample(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Sample one token per row of the (bias/penalty-processed) logits ``x``."""
        device = x.device
        b, V = x.shape
        params = [s.params for s in states]
        temp = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=device)
        x = x / temp[:, None]

        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            probs = torch.softmax(x, dim=-1)
            threshold = torch.tensor(min_p, dtype=x.dtype, device=device)[:, None] * probs.amax(-1, keepdim=True)
            x = x.masked_fill(probs < threshold, float("-inf"))

        top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
        top_p = [p.top_p for p in params]
        if any(top_k) or any(tp < 1.0 for tp in top_p):
            sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
            k = torch.tensor(top_k, dtype=torch.long, device=device)
            k_active = k > 0
            kth = sorted_x.gather(1, torch.where(k_active, k - 1, torch.full_like(k, V - 1))[:, None])
            kth = torch.where(k_active[:, None], kth, torch.full_like(kth, float("-inf")))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
            p_sorted = torch.softmax(sorted_x, dim=-1)
            mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
            tp = torch.tensor(top_p, dtype=x.dtype, device=device)[:, None]
            drop_sorted = (mass_before >= tp) & (tp < 1.0)
            drop_sorted[:, 0] = False  # the most likely token always stays
            drop_sorted |= sorted_x == float("-inf")
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))

        probs = torch.softmax(x.double(), dim=-1)
        cdf = torch.cumsum(probs, dim=-1)
        total = cdf[:, -1]
        u = torch.tensor([_draw_uniform(s.generator) for s in states], dtype=torch.float64, device=device)
        tok = torch.searchsorted(cdf, (u * total)[:, None].contiguous(), right=True)[:, 0]
        positions = torch.arange(V, device=device).expand(b, V)
        last_positive = torch.where(probs > 0, positions, torch.full_like(positions, -1)).amax(-1)
        tok = torch.minimum(tok, last_positive)
        bad = ~torch.isfinite(total) | (last_positive < 0)  # every token masked (or NaN logits)
        return torch.where(bad, torch.argmax(x, dim=-1), tok)

    @staticmethod
    def _logprobs(raw: torch.Tensor, rows: list[int], tokens: torch.Tensor, states: list[SamplingState],
                  results: list[SampleResult]) -> None:
        device = raw.device
        r = torch.tensor(rows, device=device)
        lp = torch.log_softmax(raw[r], dim=-1)
        sampled = lp.gather(1, tokens[r][:, None])[:, 0].tolist()
        k_max = min(max(states[i].params.logprobs for i in rows), lp.shape[1])
        if k_max > 0:
            # one extra candidate so ties at the k-th place can be resolved by lower id
            cand = min(k_max + 1, lp.shape[1])
            top_v, top_i = torch.topk(lp, cand, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(rows):
            k = states[i].params.logprobs
            results[i].logprob = sampled[j]
            if k == 0:
                results[i].top_logprobs = []
                continue
            pairs = sorted(zip(top_i[j], top_v[j]), key=lambda t: (-t[1], t[0]))
            results[i].top_logprobs = [(int(t), float(v)) for t, v in pairs[:k]]
