"""A checkpoint's ``tokenizer.json`` (+ ``tokenizer_config.json``, ``config.json``) -> GGUF ``tokenizer.*`` metadata.

The vocabulary is written the way llama.cpp reads it (:mod:`bitserve.plugins.gguf_tokenizer`
documents the meaning):

- BPE with byte fallback (SentencePiece style) -> ``tokenizer.ggml.model = "llama"``. A source
  without normalizer and pre-tokenizer (raw spaces in its tokens, like the demo model's) gets
  its spaces escaped to U+2581 and ``add_space_prefix = false``; a ``Prepend``/``Replace`` or
  ``Metaspace`` source keeps its tokens. Scores rank merged tokens by merge order; the merges
  are written too.
- byte-level BPE -> ``"gpt2"`` with ``tokenizer.ggml.pre`` chosen from the pre-tokenizer regex.
- anything else -> ``"none"`` (tokens and types only).

Special ids come from ``config.json`` (``bos_token_id``; ``eos_token_id`` entries fill GGUF's
three end-of-generation slots eos, eot, eom in order) or the tokenizer config's token texts.
The written metadata is then rebuilt into a tokenizer and compared with the source on probe
texts; when they differ, the source ``tokenizer.json`` is embedded as
``tokenizer.huggingface.json`` so that bitserve reads it back exactly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from gguf import GGUFValueType
from tokenizers import Tokenizer

from bitserve.plugins.checkpoint import CheckpointError, read_json_object
from bitserve.plugins.gguf_tokenizer import (
    BYTE, CONTROL, LLAMA3_PATTERN, GPT2_PATTERN, NORMAL, SPACE, UNKNOWN, UNUSED, USER_DEFINED, tokenizer_from_metadata,
)

log = logging.getLogger(__name__)

PROBES = (
    "Hello world! It's 2024; prices rose 12.5% ($3,999).\n\n  Indented\tline\r\nend",
    "unicode: \u00fcn\u00efc\u00f6d\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001f642 \u0000 ~`|\\",
    " leading space", "trailing space ", "a  b   c    d", "\n", "x",
    "What is 17 + 25? The answer is 42.",
    # a literal U+2581: a vocabulary whose spaces are escaped to it for GGUF reads it back as a space
    "a\u2581b \u2581 c\u2581\u2581",
)
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
STR, U32, I32, F32, BOOL = (GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.INT32,
                            GGUFValueType.FLOAT32, GGUFValueType.BOOL)


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = tcfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            left, _, right = m.partition(" ")
            out.append((left, right))
        else:
            out.append((m[0], m[1]))
    return out


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer, from its regex."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        patterns = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if patterns == [LLAMA3_PATTERN]:
            return "llama-bpe"
        if patterns == [GPT2_PATTERN]:
            return "gpt-2"
    return None


def _space_handling(tj: dict) -> tuple[bool, bool]:
    """(escape raw spaces to U+2581, add_space_prefix) for a SentencePiece-style BPE source."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    if norm is None and pre is None:
        return True, False
    if pre is not None and pre.get("type") == "Metaspace":
        return False, pre.get("prepend_scheme", "always") != "never"
    parts = norm.get("normalizers", [norm]) if norm else []
    return False, any(p.get("type") == "Prepend" and p.get("prepend") == SPACE for p in parts)


def _ids(tok: Tokenizer, hf_config: dict, tcfg: dict) -> tuple[int | None, list[int], int | None]:
    def text_id(key):
        value = tcfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if value else None

    bos = hf_config.get("bos_token_id")
    bos = int(bos) if bos is not None else text_id("bos_token")
    eos = hf_config.get("eos_token_id")
    eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])
    first = text_id("eos_token")
    if not eos_ids and first is not None:
        eos_ids = [first]
    elif first is not None and first in eos_ids:  # the tokenizer's own eos is GGUF's eos slot
        eos_ids.remove(first)
        eos_ids.insert(0, first)
    if len(eos_ids) > 3:
        log.warning("GGUF has three end-of-generation slots; dropping eos ids %s", eos_ids[3:])
    pad = hf_config.get("pad_token_id")
    pad = int(pad) if pad is not None else text_id("pad_token")
    return bos, eos_ids[:3], pad


def _vocab_entries(tj: dict, tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    model = tj.get("model") or {}
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise CheckpointError(f"tokenizer has {size} tokens but the embedding only {vocab_size} rows")
    kind = "none"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = "llama"
    elif model.get("type") == "BPE" and _pre_name(tj.get("pre_tokenizer")):
        kind = "gpt2"
    escape, prefix = _space_handling(tj) if kind == "llama" else (False, False)
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i) if i < size else None
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if i in added:
            kind_i = CONTROL if added[i].get("special") else USER_DEFINED
        elif kind == "llama" and _BYTE_TOKEN.match(text):
            kind_i = BYTE
        elif text == unk:
            kind_i = UNKNOWN
        else:
            kind_i = NORMAL
        if escape and kind_i == NORMAL:
            if SPACE in text:
                raise CheckpointError(f"token {i} {text!r} already contains U+2581; cannot escape spaces for GGUF")
            text = text.replace(" ", SPACE)
        tokens.append(text)
        types.append(kind_i)
    meta: dict[str, Any] = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": tokens,
                            "tokenizer.ggml.token_type": types}
    merges = _merge_pairs(model)
    if escape:
        merges = [(a.replace(" ", SPACE), b.replace(" ", SPACE)) for a, b in merges]
    if kind in ("llama", "gpt2") and merges:
        meta["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in merges]
    if kind == "llama":
        rank = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        meta["tokenizer.ggml.scores"] = [
            0.0 if (ty != NORMAL or len(t) < 2) else -float(rank.get(t, len(merges) + 1))
            for t, ty in zip(tokens, types)
        ]
        meta["tokenizer.ggml.add_space_prefix"] = prefix
    if kind == "gpt2":
        meta["tokenizer.ggml.pre"] = _pre_name(tj.get("pre_tokenizer"))
    return meta


def _same_behaviour(src: Tokenizer, rebuilt: Tokenizer, extra: list[str]) -> bool:
    for text in list(PROBES) + extra:
        for special in (True, False):
            ids = src.encode(text, add_special_tokens=special).ids
            if rebuilt.encode(text, add_special_tokens=special).ids != ids:
                return False
            if rebuilt.decode(ids, skip_special_tokens=False) != src.decode(ids, skip_special_tokens=False):
                return False
    return True


def tokenizer_metadata(folder: str | Path, hf_config: dict, vocab_size: int) -> dict[str, tuple[Any, GGUFValueType]]:
    """``key -> (value, GGUF value type)`` of the tokenizer metadata for the checkpoint in ``folder``."""
    folder = Path(folder)
    tj_path = folder / "tokenizer.json"
    if not tj_path.exists():
        raise CheckpointError(f"{tj_path}: tokenizer file is missing (a GGUF file carries its tokenizer)")
    tj = read_json_object(tj_path)
    tcfg = read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    try:
        tok = Tokenizer.from_file(str(tj_path))
    except Exception as e:
        raise CheckpointError(f"{tj_path}: cannot parse tokenizer: {e}") from e
    try:
        meta = _vocab_entries(tj, tok, vocab_size)
    except CheckpointError as e:
        raise CheckpointError(f"{tj_path}: {e}") from e
    bos, eos_ids, pad = _ids(tok, hf_config, tcfg)
    for key, value in (("bos", bos), ("padding", pad), *zip(("eos", "eot", "eom"), eos_ids)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = value
    if bos is not None:
        meta["tokenizer.ggml.add_bos_token"] = tok.encode("x").ids[:1] == [bos]
    if eos_ids:
        meta["tokenizer.ggml.add_eos_token"] = tok.encode("x").ids[-1:] == [eos_ids[0]]
    template = _chat_template(folder, tcfg)
    if template:
        meta["tokenizer.chat_template"] = template
    specials = [a["content"] for a in tj.get("added_tokens") or []]
    exact = meta["tokenizer.ggml.model"] != "none"
    if exact:
        try:
            rebuilt = tokenizer_from_metadata(tj_path, meta)
            exact = _same_behaviour(tok, rebuilt, [" ".join(specials) + " hi", "".join(specials[:8]) + "x y"])
        except CheckpointError:
            exact = False
    if not exact:
        log.info("%s: GGUF tokenizer metadata does not reproduce tokenizer.json exactly; embedding it", tj_path)
        meta["tokenizer.huggingface.json"] = tj_path.read_text()
    return {key: (value, _TYPES[key.rsplit(".", 1)[-1]] if key.rsplit(".", 1)[-1] in _TYPES else _type_of(key))
            for key, value in meta.items()}


_TYPES = {"model": STR, "pre": STR, "tokens": STR, "merges": STR, "token_type": I32, "scores": F32,
          "add_space_prefix": BOOL, "add_bos_token": BOOL, "add_eos_token": BOOL, "chat_template": STR, "json": STR}


def _type_of(key: str) -> GGUFValueType:
    if key.endswith("_token_id"):
        return U32
    raise KeyError(key)
