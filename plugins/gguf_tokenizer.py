"""A ``tokenizers`` tokenizer rebuilt from a GGUF's ``tokenizer.*`` metadata.

Supported ``tokenizer.ggml.model`` values, with llama.cpp's meaning:

- ``llama`` (SentencePiece BPE with byte fallback): spaces are escaped to U+2581 and, when
  ``tokenizer.ggml.add_space_prefix`` (default true), one is prepended to every text piece
  between special tokens; pieces merge by ``tokenizer.ggml.scores`` (the merged token's
  score, highest first) unless explicit ``tokenizer.ggml.merges`` are present; unknown
  characters fall back to the ``<0xNN>`` byte tokens.
- ``gpt2`` (byte-level BPE with ``tokenizer.ggml.merges``): the pre-tokenizer regex is chosen
  by ``tokenizer.ggml.pre`` (``gpt-2``, or the Llama 3 pattern for ``llama-bpe``/``llama3``,
  which also skips merges for whole-vocabulary words as llama.cpp does).

CONTROL tokens become special added tokens, USER_DEFINED tokens non-special added tokens;
``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` decide what ``encode`` adds. A GGUF that
embeds ``tokenizer.huggingface.json`` is read from that JSON instead. Anything else raises
a CheckpointError suggesting a ``tokenizer.json`` next to the GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from bitserve.plugins.checkpoint import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre -> (regex, ignore_merges)
PRE_TOKENIZERS = {
    "gpt-2": (GPT2_PATTERN, False),
    "gpt2": (GPT2_PATTERN, False),
    "llama-bpe": (LLAMA3_PATTERN, True),
    "llama3": (LLAMA3_PATTERN, True),
    "llama-v3": (LLAMA3_PATTERN, True),
}
_SPECIAL_IDS = ("bos", "eos", "eot", "eom", "unknown", "padding")


@dataclass
class GGUFSpecials:
    """What a chat template and the engine need besides the tokenizer itself."""

    special: dict[str, str | None] = field(default_factory=dict)  # bos_token, eos_token, unk_token, pad_token
    eos_token_ids: tuple[int, ...] = ()  # eos, eot and eom ids (llama.cpp's end-of-generation slots)
    chat_template: str | None = None


def _merges(raw: list[str] | None) -> list[tuple[str, str]] | None:
    if raw is None:
        return None
    out = []
    for m in raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"merge {m!r} is not of the form 'left right'")
        out.append((left, right))
    return out


def _merges_from_scores(vocab: dict[str, int], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's highest-score-first merging of adjacent pieces."""
    ranked = []
    for piece, idx in vocab.items():
        if types[idx] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[idx], idx, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _template(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, ids: dict[str, int]):
    if not (add_bos and bos) and not (add_eos and eos):
        return None
    head = [bos] if add_bos and bos else []
    tail = [eos] if add_eos and eos else []
    specials = [(t, ids[t]) for t in dict.fromkeys(head + tail)]
    return processors.TemplateProcessing(
        single=head + ["$A"] + tail, pair=head + ["$A"] + tail + ["$B:1"] + [f"{t}:1" for t in tail],
        special_tokens=specials,
    )


def _build_llama(meta: dict[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int], unk: str | None):
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    merges = _merges(meta.get("tokenizer.ggml.merges"))
    if merges is None:
        merges = _merges_from_scores(vocab, scores, types)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(SPACE)] if prefix else []) + [normalizers.Replace(" ", SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    return tok


def _build_gpt2(meta: dict[str, Any], vocab: dict[str, int]):
    pre = str(meta.get("tokenizer.ggml.pre", "gpt-2"))
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"pre-tokenizer 'tokenizer.ggml.pre' = '{pre}' is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    pattern, ignore_merges = PRE_TOKENIZERS[pre]
    merges = _merges(meta.get("tokenizer.ggml.merges"))
    if merges is None:
        raise ValueError("a 'gpt2' tokenizer needs 'tokenizer.ggml.merges'")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _special_ids(path, meta: dict[str, Any], n_tokens: int) -> dict[str, int | None]:
    ids = {}
    for key in _SPECIAL_IDS:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and not 0 <= int(value) < n_tokens:
            raise CheckpointError(f"{path}: 'tokenizer.ggml.{key}_token_id' = {value} is outside the {n_tokens} tokens")
        ids[key] = None if value is None else int(value)
    return ids


def specials_from_metadata(path: str | Path, meta: dict[str, Any]) -> GGUFSpecials:
    """Special token texts, end-of-generation ids and the chat template of a GGUF file."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    ids = _special_ids(path, meta, len(tokens))
    text = {k: (tokens[v] if v is not None else None) for k, v in ids.items()}
    template = meta.get("tokenizer.chat_template")
    return GGUFSpecials(
        special={"bos_token": text["bos"], "eos_token": text["eos"], "unk_token": text["unknown"],
                 "pad_token": text["padding"]},
        eos_token_ids=tuple(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)),
        chat_template=str(template) if template else None,
    )


def tokenizer_from_metadata(path: str | Path, meta: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer of a GGUF file from its metadata (see the module docstring)."""
    hf_json = meta.get("tokenizer.huggingface.json")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens and not hf_json:
        raise CheckpointError(f"{path}: the GGUF file has no 'tokenizer.ggml.tokens'; put the model's "
                              "tokenizer.json next to it")
    try:
        if hf_json:
            return Tokenizer.from_str(hf_json)
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens")
        ids = _special_ids(path, meta, len(tokens))
        text = {k: (tokens[v] if v is not None else None) for k, v in ids.items()}
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        model = str(meta.get("tokenizer.ggml.model", ""))
        if model == "llama":
            tok = _build_llama(meta, tokens, types, vocab, text["unknown"])
        elif model == "gpt2":
            tok = _build_gpt2(meta, vocab)
        else:
            raise ValueError(f"tokenizer model '{model}' cannot be rebuilt (supported: llama, gpt2)")
        added = [AddedToken(t, special=(ty != USER_DEFINED), normalized=False)
                 for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
        tok.add_special_tokens([a for a in added if a.special])
        tok.add_tokens([a for a in added if not a.special])
        post = _template(text["bos"], text["eos"], bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
                         bool(meta.get("tokenizer.ggml.add_eos_token", False)), vocab)
        if post is not None:
            tok.post_processor = post
        return tok
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers raises its own exception types
        raise CheckpointError(f"{path}: cannot rebuild the tokenizer from GGUF metadata ({e}); put the model's "
                              "tokenizer.json next to the GGUF file") from e
