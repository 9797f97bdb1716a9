"""IncrementalDetokenizer against tokenizer.decode(all ids), with a tiny byte-level BPE trained here."""

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitserve.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer

FFFD = "\ufffd"
SPECIALS = ["<s>", "</s>", "<|eot|>"]
CORPUS = [
    "héllo wörld, the quick brown fox jumps over the lazy dog.",
    "日本語のテキスト 🙂 emoji and more text, naïve café déjà vu",
    "STOP here. the end! héllo again wörld ### done",
    "Ünïcödé wörds and ascii words side by side: 10 + 20 = 30",
]
TEXTS = [
    "héllo wörld 日本語 🙂",
    "the quick brown fox 🙂🙂 jumps; naïve café",
    "Ünïcödé → ∑ 日本 語 ### end",
    "plain ascii only, nothing fancy at all here",
    "🙂日🙂本🙂語🙂 mixed émojis ✨ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def _save(tok: HFTokenizer, folder) -> Tokenizer:
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    """Byte-level BPE (like Llama 3's) with so few merges that rare characters span several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return _save(tok, tmp_path_factory.mktemp("bpe") / "tok")


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory) -> Tokenizer:
    """SentencePiece-style tokenizer: the decoder drops the leading space of the first token."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator([c for c in CORPUS if c.isascii()] * 4 + ["hello world again and again"], trainer)
    return _save(tok, tmp_path_factory.mktemp("meta") / "tok")


def stream(tok, ids, params=None, prompt=None, chunks=1, rng=None):
    """Feed ids (in chunks of 1..chunks), return (detokenizer, deltas, stop string or None)."""
    d = IncrementalDetokenizer(tok, params or SamplingParams(), prompt)
    deltas, stop, i = [], None, 0
    while i < len(ids) and stop is None:
        n = rng.randint(1, chunks) if rng else chunks
        up = d.add_tokens(ids[i:i + n])
        assert isinstance(up, DetokenizerUpdate)
        deltas.append(up.text_delta)
        assert d.text == "".join(deltas)
        stop = up.stop
        i += n
    if stop is None:
        deltas.append(d.finish())
    assert d.text == "".join(deltas)
    return d, deltas, stop


def test_some_characters_span_tokens(bpe):
    ids = bpe.encode("日本語 🙂", add_special_tokens=False)
    singles = [bpe.decode([i]) for i in ids]
    assert any(FFFD in s for s in singles), singles
    assert bpe.decode(ids) == "日本語 🙂"


@pytest.mark.parametrize("chunks", [1, 3])
def test_deltas_concatenate_to_decode_for_texts(bpe, chunks):
    rng = random.Random(chunks)
    for text in TEXTS:
        ids = bpe.encode(text, add_special_tokens=False)
        d, deltas, stop = stream(bpe, ids, chunks=chunks, rng=rng)
        assert stop is None
        assert d.text == bpe.decode(ids) == text
        assert not any(FFFD in x for x in deltas), deltas


def test_text_is_always_a_prefix_of_the_final_text(bpe):
    text = TEXTS[4]
    ids = bpe.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(bpe, SamplingParams())
    emitted_before_end = False
    for i, t in enumerate(ids):
        d.add_tokens([t])
        assert text.startswith(d.text) and FFFD not in d.text
        assert d.text == text or len(d.text) < len(text)
        emitted_before_end |= 0 < len(d.text) and i < len(ids) - 1
    assert emitted_before_end  # it streams, it does not wait for the end
    d.finish()
    assert d.text == text


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_match_decode(bpe, skip):
    rng = random.Random(int(skip))
    V = bpe.vocab_size
    params = SamplingParams(skip_special_tokens=skip)
    for _ in range(150):
        ids = [rng.randrange(V) for _ in range(rng.randint(1, 30))]
        d, deltas, _ = stream(bpe, ids, params, chunks=rng.choice([1, 2, 4]), rng=rng)
        full = bpe.decode(ids, skip_special_tokens=skip)
        assert d.text == full
        if FFFD not in full:
            assert not any(FFFD in x for x in deltas)


def test_prompt_context_byte_level_matches_decode(bpe):
    prompt = bpe.encode("日本語 prompt 🙂", add_special_tokens=False)
    rng = random.Random(5)
    for text in TEXTS:
        ids = bpe.encode(text, add_special_tokens=False)
        d, _, _ = stream(bpe, ids, prompt=prompt, chunks=2, rng=rng)
        assert d.text == text
    partial = prompt + bpe.encode("日", add_special_tokens=False)[:1]  # prompt ends inside a character
    assert bpe.decode(partial).endswith(FFFD)
    ids = bpe.encode("abc 語", add_special_tokens=False)
    assert stream(bpe, ids, prompt=partial)[0].text == "abc 語"
    # output that starts with the rest of the prompt's character: still decode(output)
    ids = bpe.encode("日", add_special_tokens=False)[1:] + bpe.encode("abc", add_special_tokens=False)
    assert stream(bpe, ids, prompt=partial)[0].text == bpe.decode(ids) == FFFD * 2 + "abc"


def test_metaspace_leading_space(metaspace):
    out = metaspace.encode("hello world again", add_special_tokens=False)
    d, _, _ = stream(metaspace, out)
    assert d.text == metaspace.decode(out) == "hello world again"
    prompt = metaspace.encode("the quick brown fox", add_special_tokens=False)
    d, deltas, _ = stream(metaspace, out, prompt=prompt)
    full, head = metaspace.decode(prompt + out), metaspace.decode(prompt)
    assert full.startswith(head) and d.text == full[len(head):] == " hello world again"
    assert not any(x.startswith("▁") for x in deltas)


def test_skip_special_tokens(bpe):
    eot = bpe.token_to_id("<|eot|>")
    ids = bpe.encode("héllo", add_special_tokens=False) + [eot] + bpe.encode(" wörld", add_special_tokens=False)
    skipped = stream(bpe, ids)[0].text
    kept = stream(bpe, ids, SamplingParams(skip_special_tokens=False))[0].text
    assert skipped == bpe.decode(ids) == "héllo wörld"
    assert kept == bpe.decode(ids, skip_special_tokens=False) == "héllo<|eot|> wörld"


def test_stop_terminated_drops_the_last_token_text(bpe):
    eot = bpe.token_to_id("<|eot|>")
    ids = bpe.encode("héllo", add_special_tokens=False) + [eot]
    for include, want in ((False, "héllo"), (True, "héllo<|eot|>")):
        d = IncrementalDetokenizer(bpe, SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include))
        d.add_tokens(ids[:-1])
        d.add_tokens(ids[-1:], stop_terminated=True)
        d.finish()
        assert d.text == want


def _stop_run(bpe, text, stops, include=False, chunks=1):
    ids = bpe.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    d = IncrementalDetokenizer(bpe, params)
    full = bpe.decode(ids)
    first = min((full.find(s), k, s) for k, s in enumerate(stops) if s in full)
    idx, _, stop = first
    got_stop, i = None, 0
    while i < len(ids):
        up = d.add_tokens(ids[i:i + chunks])
        i += chunks
        # never streams any part of the stop string (nor anything after it)
        assert len(d.text) <= (idx + len(stop) if include else idx)
        if include and up.stop is None:
            assert len(d.text) <= idx
        if up.stop is not None:
            got_stop = up.stop
            break
    assert got_stop == stop
    assert d.stop_reason == stop
    assert d.text == (full[: idx + len(stop)] if include else full[:idx])
    # after a match: nothing more
    assert d.add_tokens(ids[:3]) == DetokenizerUpdate("", None)
    assert d.finish() == ""
    return d


def test_stop_string_spanning_tokens_is_cut(bpe):
    stop = "wörld 日"
    assert len(bpe.encode(stop, add_special_tokens=False)) >= 3
    _stop_run(bpe, "héllo wörld 日本語 🙂 more", [stop])
    _stop_run(bpe, "héllo wörld 日本語 🙂 more", [stop], include=True)
    # a near miss first ("wörld x") must be streamed, the real match cut
    d = _stop_run(bpe, "wörld x wörld 日本", [stop])
    assert d.text == "wörld x "


@pytest.mark.parametrize("include", [False, True])
def test_random_stop_strings_against_oracle(bpe, include):
    rng = random.Random(7 + include)
    for _ in range(60):
        text = rng.choice(TEXTS) + " " + rng.choice(TEXTS)
        start = rng.randrange(len(text) - 4)
        stop = text[start:start + rng.randint(1, 6)].strip() or "e"
        stops = [stop] + ([rng.choice(["zzz", "日本", "ö", "🙂 "])] if rng.random() < 0.5 else [])
        _stop_run(bpe, text, stops, include=include, chunks=rng.choice([1, 2, 5]))


def test_earliest_stop_wins(bpe):
    d = _stop_run(bpe, "the quick brown fox jumps", ["fox", "quick"])
    assert d.text == "the " and d.stop_reason == "quick"
    # both complete on the same character: the one that starts first wins, whatever the list order
    d = _stop_run(bpe, "xabcdx yz", ["d", "bcd"])
    assert d.text == "xa" and d.stop_reason == "bcd"


def test_unmatched_stop_prefix_is_held_then_flushed(bpe):
    ids = bpe.encode("plain ascii ST", add_special_tokens=False)
    d = IncrementalDetokenizer(bpe, SamplingParams(stop=["STOP"]))
    for t in ids:
        assert d.add_tokens([t]).stop is None
    assert d.text == "plain ascii " and d.finish() == "ST" and d.text == "plain ascii ST"
    assert d.stop_reason is None


def test_multibyte_stop_string(bpe):
    stop = "語"
    assert all(FFFD in bpe.decode([t]) for t in bpe.encode(stop, add_special_tokens=False))
    d = _stop_run(bpe, "日本語 text", [stop])
    assert d.text == "日本"


def test_windowed_decoding_is_incremental(bpe):
    """Each step decodes a few recent tokens, not the whole output."""

    class Spy:
        def __init__(self, tok):
            self.tok, self.lengths = tok, []

        def decode(self, ids, skip_special_tokens=True):
            self.lengths.append(len(ids))
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = " ".join(TEXTS * 6)
    ids = bpe.encode(text, add_special_tokens=False)
    spy = Spy(bpe)
    d, _, _ = stream(spy, ids, SamplingParams(stop=["never-there"]))
    assert d.text == text
    assert len(ids) > 300 and max(spy.lengths) <= 8
    assert sum(spy.lengths) <= 6 * len(ids)
    # nor does it keep the whole text to search: only the last chars a stop string could start in
    # (a step's work would otherwise grow with the output)
    assert len(d._tail) <= len("never-there") - 1 < len(d.text)


def test_stop_strings_wait_for_min_tokens(bpe):
    """vLLM v1: stop strings are looked for once more than min_tokens tokens were generated, in the
    text that is new since; a stop completed earlier does not end the request."""
    ids = bpe.encode("the end! the end! the", add_special_tokens=False)
    first_end = next(i for i in range(1, len(ids) + 1) if "end" in bpe.decode(ids[:i]))
    for min_tokens, want in ((0, "the "), (first_end, "the end! the ")):
        d = IncrementalDetokenizer(bpe, SamplingParams(stop=["end"], min_tokens=min_tokens, max_tokens=64))
        for t in ids:
            d.add_tokens([t])
            if d.finished:
                break
        assert d.finished and d.stop_reason == "end" and d.text == want, (min_tokens, d.text)


def test_stop_string_completed_by_the_final_flush_is_reported(tmp_path):
    """A token whose text is "!" plus the first byte of a 3-byte character is held back (the character
    is incomplete); when the request ends there (length or eos) the flush completes the stop "!":
    the choice ends with STOP and that stop string, its text cut before it."""
    from bitserve.engine.core import TokenDelta
    from bitserve.engine.output_processor import RequestState
    from bitserve.engine.request import FinishReason

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["!\u00e2"] = len(vocab)  # "!" + byte 0xE2 (the first of "\u20ac"), in ByteLevel's alphabet
    vocab["</s>"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("!", "\u00e2")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["</s>"])
    tok = _save(hf, tmp_path / "bang")
    for reason, tail in ((FinishReason.LENGTH, []), (FinishReason.EOS, [vocab["</s>"]])):
        state = RequestState("r", [5], SamplingParams(stop=["!"]), tok)
        tokens = [vocab["h"], vocab["i"], vocab["!\u00e2"]] + tail
        outs = [state.process(TokenDelta("r", [t], finish_reason=reason if i == len(tokens) - 1 else None))[0]
                for i, t in enumerate(tokens)]
        assert "".join(o.text for o in outs) == "hi"
        assert (outs[-1].finish_reason, outs[-1].stop_reason) == (FinishReason.STOP, "!")


class _CountingDecode:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _feed(tok, ids, params, sizes):
    """Add ``ids`` in chunks of ``sizes`` (cycled); returns (detokenizer, text streamed before the end,
    stop, number of tokens that counted)."""
    d = IncrementalDetokenizer(tok, params)
    i, k, counted, stop, streamed = 0, 0, 0, None, ""
    while i < len(ids) and stop is None:
        n = sizes[k % len(sizes)]
        chunk = ids[i:i + n]
        up = d.add_tokens(chunk)
        assert up.num_tokens == len(chunk) if up.stop is None else 0 < up.num_tokens <= len(chunk)
        streamed += up.text_delta
        counted += up.num_tokens
        stop, i, k = up.stop, i + n, k + 1
    return d, streamed, stop, counted


@pytest.fixture(scope="module")
def demo_tokenizer() -> Tokenizer:
    """The demo model's tokenizer: SentencePiece-style with byte-fallback tokens (``<0x0A>``), as
    Llama 2 and SentencePiece GGUFs have: a run of byte tokens decodes as one."""
    from bitserve.demo import DEMO_MODEL_PATH

    tok = Tokenizer(DEMO_MODEL_PATH)
    assert len(tok.byte_token_ids) == 256
    return tok


def test_byte_fallback_run_in_a_coalesced_delta(demo_tokenizer):
    """"a", "\n" (byte token), a stray continuation byte, "a": one at a time the stop "\n" ends
    the text after two tokens; decoding the four at once would read "a\ufffd\ufffda" (the decoder
    rejects the whole byte run) and miss it."""
    tok = demo_tokenizer
    ids = [tok.token_to_id(t) for t in ("a", "<0x0A>", "<0x80>", "a")]
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["\n"]))
    up = d.add_tokens(ids)
    assert (up.text_delta, up.stop, up.num_tokens, d.text) == ("a", "\n", 2, "a")
    # valid UTF-8 in the delta ("\u010f5" as three byte tokens), then a stray byte: the next decode
    # window must start where adding them one at a time leaves it
    b = [tok.token_to_id(f"<0x{x:02X}>") for x in (0xC4, 0x8F, 0x35, 0x91)]
    ids = b + [tok.token_to_id("a")]
    texts = []
    for chunks in ([ids[:1], ids[1:2], ids[2:3], ids[3:4], ids[4:]], [ids[:3], ids[3:4], ids[4:]]):
        d = IncrementalDetokenizer(tok, SamplingParams())
        texts.append([d.add_tokens(c).text_delta for c in chunks] + [d.finish()])
    assert "".join(texts[0]) == "".join(texts[1]) and texts[1][0] == "\u010f5", texts


@pytest.mark.parametrize("which", ["bpe", "demo_tokenizer"])
def test_several_tokens_at_once_match_one_at_a_time(which, request):
    """A coalesced delta (several tokens) gives the text, stop string and token count of the same
    tokens added one at a time -- with stop strings, min_tokens, characters spanning tokens and
    byte-fallback tokens -- and, when nothing needs one token at a time, decodes twice per delta
    instead of twice per token."""
    bpe = request.getfixturevalue(which)  # byte-level BPE, or SentencePiece with byte fallback
    rng = random.Random(11)
    V = bpe.vocab_size
    for trial in range(200):
        if trial % 2:
            text = rng.choice(TEXTS) + rng.choice([" ", "\n"]) + rng.choice(TEXTS)
            ids = bpe.encode(text, add_special_tokens=False)
        else:
            ids = [rng.randrange(V) for _ in range(rng.randint(2, 40))]
        full = bpe.decode(ids)
        stops = []
        if rng.random() < 0.6 and len(full) > 6:
            start = rng.randrange(len(full) - 3)
            stops = [full[start:start + rng.randint(1, 4)]] + rng.sample(["zzz", "日本", "ö", "🙂 ", "e", "\n"], 1)
        params = SamplingParams(stop=stops, min_tokens=rng.choice([0, 0, 3, 9]), max_tokens=64,
                                include_stop_str_in_output=rng.random() < 0.3)
        one, one_streamed, one_stop, one_counted = _feed(bpe, ids, params, [1])
        sizes = [rng.randint(2, 9) for _ in range(4)]
        many, many_streamed, many_stop, many_counted = _feed(bpe, ids, params, sizes)
        assert (many_streamed, many_stop, many_counted) == (one_streamed, one_stop, one_counted), (ids, stops, sizes)
        assert many.finish() == one.finish() and many.text == one.text
        assert (many.stop_reason, many.num_tokens) == (one.stop_reason, one.num_tokens)
        if not stops and which == "bpe":  # (a byte-fallback run cut by a decode window reads otherwise)
            assert many.text == full

    text = " ".join([TEXTS[3]] * 4)  # ascii: every chunk ends on a whole character
    ids = bpe.encode(text, add_special_tokens=False)
    calls = {}
    for size in (1, 8):
        spy = _CountingDecode(bpe)
        d, _, _, _ = _feed(spy, ids, SamplingParams(), [size])
        d.finish()
        assert d.text == text
        calls[size] = spy.calls
    chunks = -(-len(ids) // 8)
    assert calls[1] >= 2 * len(ids) - 2 and calls[8] <= 2 * chunks + 1, (len(ids), calls)
