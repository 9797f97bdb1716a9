"""Tokenizer and chat template of a checkpoint (``tokenizer.json`` + ``tokenizer_config.json``).

Encoding/decoding use the ``tokenizers`` library; the chat template is rendered
with jinja2 the way Hugging Face's ``apply_chat_template`` does (sandboxed,
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``).

GGUF models (a ``.gguf`` file, or a folder holding one and no safetensors): a
``tokenizer.json`` next to the file wins (with its ``tokenizer_config.json`` when
present); otherwise the tokenizer is rebuilt from the file's ``tokenizer.*``
metadata (:mod:`bitserve.plugins.gguf_tokenizer`). Special tokens and the chat
template come from the GGUF metadata wherever ``tokenizer_config.json`` lacks them.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from bitserve.plugins.checkpoint import CheckpointError, read_json_object
from bitserve.plugins.gguf_paths import find_gguf

ROLES = ("system", "user", "assistant", "tool")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (no template, or the template refused it)."""


def _token_text(value: Any, key: str = "token") -> str | None:
    """A special token's text from tokenizer_config.json: a string, an AddedToken object
    (``{"content": ...}``) or null; CheckpointError for anything else (an id, a list)."""
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"tokenizer_config.json: {key} must be the token's text, not {value!r}")
    return value


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: Hugging Face chat templates mark the assistant's
    tokens with it (for training masks); rendering a prompt, its body is plain output."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class Tokenizer:
    def __init__(self, folder: str | Path):
        path = Path(folder)
        gguf_file = find_gguf(path)
        folder = gguf_file.parent if gguf_file is not None else path
        self._extra_eos_ids: tuple[int, ...] = ()
        self.config: dict = self._read_config(folder)
        tokenizer_json = folder / "tokenizer.json"
        if gguf_file is not None and not tokenizer_json.exists():
            self._tok = self._from_gguf(gguf_file)
        else:
            if not tokenizer_json.exists():
                raise CheckpointError(f"{tokenizer_json}: tokenizer file is missing (bitserve needs a tokenizer.json)")
            try:
                self._tok = HFTokenizer.from_file(str(tokenizer_json))
            except Exception as e:
                raise CheckpointError(f"{tokenizer_json}: cannot parse tokenizer: {e}") from e
            if gguf_file is not None:
                self._from_gguf(gguf_file, build=False)  # special tokens and template the sidecar lacks
        # the template's special-token variables, checked once here (a bad one is the checkpoint's fault)
        self._special = {key: _token_text(self.config.get(key), key)
                         for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_token = self._special["bos_token"]
        self.eos_token = self._special["eos_token"]
        self.chat_template = self._find_template(folder)
        self._template = None

    @staticmethod
    def _read_config(folder: Path) -> dict:
        config_path = folder / "tokenizer_config.json"
        return read_json_object(config_path) if config_path.exists() else {}

    def _from_gguf(self, gguf_file: Path, build: bool = True) -> HFTokenizer | None:
        """Fill special tokens / template that tokenizer_config.json lacks from the GGUF metadata;
        return the tokenizer rebuilt from that metadata when ``build``."""
        from bitserve.plugins.gguf_file import GGUFFile
        from bitserve.plugins.gguf_tokenizer import specials_from_metadata, tokenizer_from_metadata

        meta = GGUFFile(gguf_file).meta
        specials = specials_from_metadata(gguf_file, meta)
        for key, value in specials.special.items():
            if value is not None and self.config.get(key) is None:
                self.config[key] = value
        if specials.chat_template and not self.config.get("chat_template"):
            self.config["chat_template"] = specials.chat_template
        self._extra_eos_ids = specials.eos_token_ids
        return tokenizer_from_metadata(gguf_file, meta) if build else None

    def _find_template(self, folder: Path) -> str | None:
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.exists():
            try:
                return jinja_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{jinja_file}: not UTF-8 text: {e}") from e
        template = self.config.get("chat_template")
        where = "tokenizer_config.json 'chat_template'"
        if isinstance(template, list):  # named templates: use "default"
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
                raise CheckpointError(f"{where}: a list of named templates needs {{'name', 'template'}} objects")
            named = {t.get("name"): t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{where} must be a string or a list of named templates, not "
                                  f"{type(template).__name__}")
        return template

    # -- ids ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of byte-fallback tokens (``<0x0A>``, as in Llama 2 and SentencePiece GGUFs). Their
        decoder joins a run of them before it reads UTF-8, so their text depends on their neighbours."""
        return frozenset(i for t, i in self._tok.get_vocab(with_added_tokens=False).items()
                         if _BYTE_TOKEN.fullmatch(t))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        tid = self.token_to_id(self.eos_token) if self.eos_token else None
        return tuple(dict.fromkeys((() if tid is None else (tid,)) + self._extra_eos_ids))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template, bos/eos tokens), and
        ``generation_config.json`` with every end-of-generation id, so the folder loads without the
        source (a GGUF's vocabulary becomes an ordinary Hugging Face tokenizer)."""
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.update({k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                         ("chat_template", self.chat_template)) if v is not None})
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.eos_token_ids:
            (folder / "generation_config.json").write_text(
                json.dumps({"eos_token_id": list(self.eos_token_ids)}, indent=2) + "\n")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------
    def _compiled(self):
        if self._template is None:
            if not self.chat_template:
                raise ChatTemplateError("this model has no chat template (tokenizer_config.json 'chat_template')")
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationBlock]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation to the prompt text the model was trained on."""
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ChatTemplateError(f"messages[{i}].role '{m['role']}' is not one of {ROLES}")
        special = self._special
        try:
            return self._compiled().render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **special, **kwargs
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: the template's operations on a message's values
            raise ChatTemplateError(f"chat template failed: {e}") from e
        except (ArithmeticError, LookupError, RecursionError, ValueError, AttributeError, MemoryError) as e:
            # the template's own code (1/0, range(10**8), a macro calling itself, ...): its failure, not ours
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered conversation (the template emits any special tokens itself)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
