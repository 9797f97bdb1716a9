"""Sampler: each transform against a float64 re-implementation, statistics, seeds, batch invariance, logprobs."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from bitserve.engine.sampler import SampleResult, Sampler, SamplingState, derive_seed, make_generator
from bitserve.sampling_params import SamplingParams

sampler = Sampler()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state(params=None, prompt=(), output=(), seed=0, index=0, eos=()):
    params = params or SamplingParams()
    gen = None if params.greedy else make_generator(params.seed, seed, index)
    return SamplingState(params, list(prompt), list(output), gen, frozenset(eos))


# -- float64 oracle ------------------------------------------------------------------------
def ref_process(raw, st: SamplingState) -> np.ndarray:
    """Bias, min_tokens and penalties, written out token by token in float64."""
    p, x = st.params, np.array(raw, dtype=np.float64)
    for tok, bias in p.logit_bias.items():
        x[tok] += bias
    if len(st.output_token_ids) < p.min_tokens:
        for tok in set(p.stop_token_ids) | (set() if p.ignore_eos else set(st.eos_token_ids)):
            x[tok] = -math.inf
    counts = Counter(st.output_token_ids)
    seen = set(st.prompt_token_ids) | set(st.output_token_ids)
    for tok in range(len(x)):
        if tok in seen:
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
        x[tok] -= p.frequency_penalty * counts[tok] + p.presence_penalty * (counts[tok] > 0)
    return x


def ref_probs(raw, st: SamplingState) -> np.ndarray:
    """The distribution a non-greedy row samples from: temperature -> min_p -> top_k -> top_p."""
    p = st.params
    x = ref_process(raw, st) / p.temperature
    V = len(x)

    def softmax(v):
        e = np.exp(v - v[np.isfinite(v)].max())
        e[~np.isfinite(v)] = 0.0
        return e / e.sum()

    probs = softmax(x)
    if p.min_p > 0:
        x[probs < p.min_p * probs.max()] = -math.inf
    if 0 < p.top_k < V:
        kth = sorted(x, reverse=True)[p.top_k - 1]
        x[x < kth] = -math.inf
    if p.top_p < 1:
        probs = softmax(x)
        order = sorted(range(V), key=lambda t: (-probs[t], t))
        mass = 0.0
        for rank, tok in enumerate(order):
            if rank > 0 and mass >= p.top_p:
                x[tok] = -math.inf
            mass += probs[tok]
    return softmax(x)


def sample_many(raw_row, params, n, eos=(), prompt=(), output=()):
    """n independent draws of one row (one batch of n rows, each with its own seed)."""
    states = [state(params, prompt, output, seed=1000 + i, eos=eos) for i in range(n)]
    logits = torch.tensor(raw_row, dtype=torch.float32).expand(n, -1).contiguous()
    return [r.token_id for r in sampler(logits, states)]


def total_variation(tokens, probs):
    freq = np.bincount(tokens, minlength=len(probs)) / len(tokens)
    return 0.5 * np.abs(freq - probs).sum()


ROW = [2.0, 1.5, 1.0, 0.8, 0.5, 0.1, -0.2, -0.5, -1.0, -2.0, -3.0, 0.3]


# -- processors: hand-computed values ------------------------------------------------------
def test_repetition_penalty_hand_computed():
    st = state(SamplingParams(repetition_penalty=2.0), prompt=[0, 4], output=[1])
    out = sampler.apply_processors(torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]]), [st])
    # seen tokens 0, 4 (prompt) and 1 (output): positive / 2, negative * 2; others untouched
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.5, -2.0]


def test_presence_frequency_penalties_hand_computed():
    st = state(SamplingParams(presence_penalty=0.25, frequency_penalty=0.5), prompt=[0, 2], output=[3, 3, 1])
    out = sampler.apply_processors(torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]]), [st])
    # output counts: token 3 twice, token 1 once; prompt tokens are not penalised
    assert out[0].tolist() == [1.0, 1.0 - 0.5 - 0.25, 1.0, 1.0 - 1.0 - 0.25, 1.0]


def test_negative_penalties_reward():
    st = state(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5), output=[2])
    out = sampler.apply_processors(torch.zeros(1, 4), [st])
    assert out[0].tolist() == [0.0, 0.0, 1.5, 0.0]


def test_penalty_counts_follow_the_outputs_across_steps():
    """The sampler keeps penalty counts between steps (engine/penalty_table.py) and adds only each
    step's new tokens: over 60 steps of sequences that grow, finish (release) and start (reusing the
    freed rows), with output lists swapped or cut back, and the vocabulary changing once (a new
    table generation), every step equals the float64 oracle."""
    rng = random.Random(7)
    keeper = Sampler()
    kinds = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.4), dict(presence_penalty=-0.7),
             dict(repetition_penalty=0.8, frequency_penalty=-0.2, presence_penalty=0.5), dict()]
    live = []
    vocab = 23
    for step in range(60):
        if step == 40:
            vocab = 31  # another model's logits: every row is rebuilt
        while len(live) < 6 or rng.random() < 0.2:
            live.append(state(SamplingParams(**rng.choice(kinds)), prompt=[rng.randrange(vocab) for _ in range(5)],
                              output=[rng.randrange(vocab) for _ in range(rng.randrange(3))]))
        for st in live:
            st.output_token_ids.append(rng.randrange(min(vocab, 23)))
        if step % 13 == 5:
            live[0].output_token_ids = live[0].output_token_ids[:2]  # cut back (a new list)
        if step % 17 == 3:
            del live[1].output_token_ids[1:]  # cut back in place
        raw = torch.randn(len(live), vocab, generator=torch.Generator().manual_seed(step))
        out = keeper.apply_processors(raw, live)
        for i, st in enumerate(live):
            np.testing.assert_allclose(out[i].double().numpy(), ref_process(raw[i].tolist(), st), rtol=1e-6,
                                       atol=1e-6, err_msg=f"step {step} row {i} {st.params}")
        for st in [st for st in live if rng.random() < 0.25]:
            keeper.release(st)
            live.remove(st)
    assert keeper.penalties.rows_in_use == sum(1 for st in live if st.penalty_row is not None
                                              and st.penalty_row.generation == keeper.penalties.generation)
    assert keeper.penalties.generation == 2


def test_logit_bias_added():
    st = state(SamplingParams(logit_bias={1: 3.0, 3: -100}))
    out = sampler.apply_processors(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), [st])
    assert out[0].tolist() == [0.5, 3.5, 0.5, -99.5]


def test_min_tokens_masks_eos_and_stop_ids():
    params = SamplingParams(min_tokens=3, stop_token_ids=[2], max_tokens=10)
    before = state(params, output=[0, 0], eos=[4])
    after = state(params, output=[0, 0, 0], eos=[4])
    out = sampler.apply_processors(torch.zeros(2, 5), [before, after])
    assert out[0].tolist() == [0.0, 0.0, -math.inf, 0.0, -math.inf]
    assert out[1].tolist() == [0.0] * 5
    # ignore_eos: eos is not masked (it does not end the request anyway); stop ids still are
    ign = state(SamplingParams(min_tokens=3, stop_token_ids=[2], ignore_eos=True), eos=[4])
    assert sampler.apply_processors(torch.zeros(1, 5), [ign])[0].tolist() == [0.0, 0.0, -math.inf, 0.0, 0.0]


def test_min_tokens_keeps_greedy_off_eos():
    params = SamplingParams(temperature=0, min_tokens=2, max_tokens=5)
    logits = torch.tensor([[0.0, 1.0, 5.0]])  # eos = 2 is the argmax
    st = state(params, eos=[2])
    picks = []
    for _ in range(3):
        tok = sampler(logits, [st])[0].token_id
        picks.append(tok)
        st.output_token_ids.append(tok)
    assert picks == [1, 1, 2]


def test_processors_match_float64_oracle_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    V = 40
    states = []
    for i in range(8):
        params = SamplingParams(
            repetition_penalty=rnd.choice([1.0, 0.7, 1.3]), presence_penalty=rnd.uniform(-2, 2),
            frequency_penalty=rnd.uniform(-2, 2), logit_bias={rnd.randrange(V): rnd.uniform(-5, 5) for _ in range(3)},
            min_tokens=rnd.choice([0, 5]), max_tokens=10, stop_token_ids=[rnd.randrange(V)])
        states.append(state(params, prompt=[rnd.randrange(V) for _ in range(6)],
                            output=[rnd.randrange(V) for _ in range(rnd.randrange(8))], eos=[V - 1]))
    raw = torch.randn(8, V, generator=gen) * 3
    out = sampler.apply_processors(raw, states)
    for i, st in enumerate(states):
        np.testing.assert_allclose(out[i].double().numpy(), ref_process(raw[i].tolist(), st), rtol=1e-6, atol=1e-5)


# -- greedy -----------------------------------------------------------------------------------
def test_greedy_is_argmax_of_processed_logits():
    rnd = random.Random(1)
    V = 30
    states = [state(SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.7,
                                   logit_bias={rnd.randrange(V): 2.0}),
                    prompt=[rnd.randrange(V) for _ in range(5)], output=[rnd.randrange(V) for _ in range(5)])
              for _ in range(6)]
    raw = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    got = [r.token_id for r in sampler(raw, states)]
    assert got == [int(np.argmax(ref_process(raw[i].tolist(), st))) for i, st in enumerate(states)]
    assert all(st.generator is None for st in states)


def test_greedy_tie_takes_lowest_id():
    res = sampler(torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0]]), [state(SamplingParams(temperature=0))])
    assert res[0].token_id == 1


# -- random sampling ----------------------------------------------------------------------------
def test_top_k_1_equals_greedy():
    raw = torch.randn(1, 50, generator=torch.Generator().manual_seed(2)) * 2
    want = int(raw.argmax())
    assert set(sample_many(raw[0].tolist(), SamplingParams(temperature=1.5, top_k=1), 200)) == {want}


def test_tiny_top_p_is_argmax():
    raw = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)) * 2
    want = int(raw.argmax())
    assert set(sample_many(raw[0].tolist(), SamplingParams(temperature=1.0, top_p=1e-6), 200)) == {want}


def test_logit_bias_plus_100_forces_a_token():
    raw = torch.randn(1, 50, generator=torch.Generator().manual_seed(4)) * 3
    assert set(sample_many(raw[0].tolist(), SamplingParams(temperature=1.0, logit_bias={17: 100}), 200)) == {17}
    banned = sample_many([5.0, 0.0, 0.0], SamplingParams(temperature=1.0, logit_bias={0: -100}), 300)
    assert 0 not in banned and set(banned) == {1, 2}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, repetition_penalty=1.8, presence_penalty=0.5, frequency_penalty=0.3),
], ids=["plain", "temperature", "top_k", "top_p", "min_p", "combined", "penalties"])
def test_sampled_distribution_matches_oracle(params):
    prompt, output = [0, 2], [1, 1, 3]
    probs = ref_probs(ROW, state(params, prompt, output))
    tokens = sample_many(ROW, params, 4000, prompt=prompt, output=output)
    assert all(probs[t] > 0 for t in tokens), "sampled a token the filters removed"
    assert total_variation(tokens, probs) < 0.04


def test_min_p_filters():
    params = SamplingParams(temperature=1.0, min_p=0.3)
    probs = ref_probs(ROW, state(params))
    allowed = {t for t in range(len(ROW)) if probs[t] > 0}
    full = np.exp(ROW) / np.exp(ROW).sum()
    assert allowed == {t for t in range(len(ROW)) if full[t] >= 0.3 * full.max()} and 1 < len(allowed) < len(ROW)
    assert set(sample_many(ROW, params, 1000)) == allowed


def test_top_k_keeps_ties_with_kth():
    tokens = sample_many([1.0, 2.0, 1.0, 0.0, 1.0], SamplingParams(temperature=1.0, top_k=2), 600)
    assert set(tokens) == {0, 1, 2, 4}  # the 2nd-largest logit (1.0) is shared by three tokens


# -- seeds, n > 1, batch invariance -----------------------------------------------------------
def run_steps(params, steps, raw_fn, seed=0, index=0, extra_rows=0, rng_seed=99):
    """Generate `steps` tokens for one sequence, optionally inside a batch of other random rows."""
    st = state(params, prompt=[1, 2, 3], seed=seed, index=index)
    rnd = random.Random(rng_seed)
    others = []
    for j in range(extra_rows):
        p = SamplingParams(temperature=rnd.choice([0, 0.5, 1.0, 2.0]), top_p=rnd.choice([1.0, 0.5]),
                           top_k=rnd.choice([0, 3]), min_p=rnd.choice([0.0, 0.1]),
                           repetition_penalty=rnd.choice([1.0, 1.2]), logprobs=rnd.choice([None, 3]))
        others.append(state(p, prompt=[rnd.randrange(64)], seed=j + 500))
    out, lps = [], []
    noise = torch.Generator().manual_seed(rng_seed)
    for step in range(steps):
        row = raw_fn(step)
        rows = [torch.randn(64, generator=noise) * 3 for _ in others]
        pos = rnd.randrange(len(others) + 1)
        batch_states = others[:pos] + [st] + others[pos:]
        logits = torch.stack(rows[:pos] + [row] + rows[pos:])
        res = sampler(logits, batch_states)
        for s, r in zip(batch_states, res):
            s.output_token_ids.append(r.token_id)
        out.append(res[pos].token_id)
        lps.append((res[pos].logprob, res[pos].top_logprobs))
    return out, lps


def _row(step):
    return torch.randn(64, generator=torch.Generator().manual_seed(step)) * 1.5


PARAMS = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.02, repetition_penalty=1.1,
                        frequency_penalty=0.2, seed=1234, logprobs=5)


def test_same_seed_same_tokens():
    a, _ = run_steps(PARAMS, 50, _row)
    b, _ = run_steps(PARAMS, 50, _row)
    assert a == b and len(set(a)) > 5


def test_batch_invariance():
    alone, lp_alone = run_steps(PARAMS, 50, _row)
    batched, lp_batched = run_steps(PARAMS, 50, _row, extra_rows=5)
    assert alone == batched
    for (a_lp, a_top), (b_lp, b_top) in zip(lp_alone, lp_batched):
        assert a_lp == pytest.approx(b_lp, abs=1e-5)
        assert [t for t, _ in a_top] == [t for t, _ in b_top]


def test_different_seeds_differ():
    a, _ = run_steps(PARAMS, 50, _row)
    b, _ = run_steps(SamplingParams(**{**PARAMS.__dict__, "seed": 4321}), 50, _row)
    assert a != b


def test_parallel_samples_get_distinct_streams():
    params = SamplingParams(temperature=1.0, seed=7, n=3)
    streams = [run_steps(params, 30, _row, index=i)[0] for i in range(3)]
    assert len({tuple(s) for s in streams}) == 3
    assert derive_seed(7, 0, 0) == 7 and derive_seed(None, 55, 0) == 55
    assert len({derive_seed(7, 0, i) for i in range(100)} | {derive_seed(8, 0, 0)}) == 101
    g = make_generator(None, 123)
    assert torch.rand(3, generator=g).tolist() == torch.rand(3, generator=torch.Generator().manual_seed(123)).tolist()


def test_unseeded_requests_use_default_seed():
    params = SamplingParams(temperature=1.0)
    a, _ = run_steps(params, 30, _row, seed=1)
    b, _ = run_steps(params, 30, _row, seed=1)
    c, _ = run_steps(params, 30, _row, seed=2)
    assert a == b and a != c


# -- logprobs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_are_raw_log_softmax(k):
    raw = torch.randn(3, 100, generator=torch.Generator().manual_seed(k)) * 4
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, logit_bias={7: 50}, logprobs=k),
              SamplingParams(temperature=0, logprobs=k, presence_penalty=1.0),
              SamplingParams(temperature=1.0)]
    states = [state(params[0], prompt=[1, 2], output=[3]), state(params[1], output=[0]), state(params[2])]
    res = sampler(raw, states)
    for i in range(2):
        want = torch.log_softmax(raw[i].double(), -1)
        assert res[i].logprob == pytest.approx(float(want[res[i].token_id]), abs=1e-5)
        top = res[i].top_logprobs
        assert len(top) == k
        order = sorted(range(100), key=lambda t: (-float(want[t]), t))[:k]
        assert [t for t, _ in top] == order
        assert [v for _, v in top] == sorted([v for _, v in top], reverse=True)
        for t, v in top:
            assert v == pytest.approx(float(want[t]), abs=1e-5)
    assert res[0].token_id == 7  # the bias decided the sample, not the reported logprob
    assert res[2].logprob is None and res[2].top_logprobs is None


def test_logprobs_tie_order_by_id():
    res = sampler(torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]]), [state(SamplingParams(temperature=0, logprobs=2))])
    assert [t for t, _ in res[0].top_logprobs] == [1, 2]


def test_bad_shape_rejected_and_empty_batch():
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(2, 5), [state()])
    assert sampler(torch.zeros(0, 5), []) == []
    assert isinstance(sampler(torch.zeros(1, 5), [state()])[0], SampleResult)


def test_all_masked_row_does_not_crash():
    st = state(SamplingParams(temperature=1.0, top_k=2))
    res = sampler(torch.full((1, 4), float("-inf")), [st])
    assert 0 <= res[0].token_id < 4
