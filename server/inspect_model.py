"""``bitserve inspect``: what a checkpoint folder holds, without loading its weights.

:func:`inspect_checkpoint` returns a plain dict (JSON-serialisable): the format plugin that claims
it, the architecture, logical parameter counts, on-disk bits per weight of the decoder body and of
the LM head, tensor bytes, and KV-cache bytes per token for every KV dtype (from
:class:`~bitserve.engine.kv_cache.KVCacheSpec`). ``load=True`` also builds the model on the CPU and
reports the in-memory bytes and layer types (e.g. what ``fakequant`` repacked).
:func:`render_inspection` formats the dict as text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from bitserve.convert_source import projection_specs
from bitserve.engine.kv_cache import FLOAT_DTYPES as KV_FLOAT_DTYPES
from bitserve.engine.kv_cache import QUANT_BITS, KVCacheSpec, default_block_size
from bitserve.model_config import ModelConfig
from bitserve.plugins.base import QuantLinear
from bitserve.plugins.checkpoint import CheckpointError, CheckpointReader, read_json_object
from bitserve.plugins.registry import FormatRegistry, UnknownFormatError

KV_DTYPES = tuple(KV_FLOAT_DTYPES) + tuple(QUANT_BITS)
# OneBit's config names its llama "bitllama"; the shapes read the same
_SHAPE_ALIASES = {"bitllama": "llama"}


def _read_config(folder: Path) -> dict:
    return read_json_object(folder / "config.json")


def _open(folder: Path):
    """(reader, config.json dict); GGUF paths too where the loader can open them."""
    from bitserve import loader

    opener = getattr(loader, "open_checkpoint", None)  # knows GGUF files as well as safetensors folders
    if opener is not None:
        return opener(folder)
    return CheckpointReader(folder), _read_config(folder)


def _model_config(config: dict) -> ModelConfig:
    model_type = config.get("model_type", "llama")
    if model_type in _SHAPE_ALIASES:
        config = {**config, "model_type": _SHAPE_ALIASES[model_type]}
    return ModelConfig.from_hf(config)


def kv_bytes_per_token(cfg: ModelConfig) -> dict[str, int | None]:
    """K+V bytes of one token over all layers per KV dtype (scales amortised; None where unsupported)."""
    out: dict[str, int | None] = {}
    for dtype in KV_DTYPES:
        try:
            spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, default_block_size(dtype), dtype,
                               num_stage_slots=1 if dtype in ("int4", "int2") else 0)
            out[dtype] = spec.bytes_per_token
        except ValueError:
            out[dtype] = None
    return out


def _bytes_under(reader: CheckpointReader, prefixes: tuple[str, ...]) -> int:
    return reader.nbytes([n for n in reader.names() if n.startswith(prefixes)])


def inspect_checkpoint(path: str | Path, *, registry: FormatRegistry | None = None, load: bool = False) -> dict:
    """Describe the checkpoint folder ``path`` (see the module docstring for the keys)."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    reader, config = _open(folder)
    registry = registry or FormatRegistry()
    info: dict = {"path": str(folder), "format": None, "format_description": None}
    try:
        plugin = registry.detect(config, reader.names(), reader)
        info["format"], info["format_description"] = plugin.name, plugin.description
    except UnknownFormatError as e:
        info["format_error"] = str(e)
    cfg = _model_config(config)
    specs = projection_specs(cfg)
    body = sum(s.out_features * s.in_features for s in specs)
    embedding = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else embedding
    norm_names = [n for n in reader.names() if len(n.split(".")) >= 2 and "norm" in n.split(".")[-2]]
    norms = sum(_numel(reader.shape(n)) for n in norm_names)
    body_bytes = _bytes_under(reader, tuple(s.prefix + "." for s in specs))
    embed_bytes = _bytes_under(reader, ("model.embed_tokens.",))
    head_bytes = _bytes_under(reader, ("lm_head.",))
    total_bytes = reader.nbytes()
    info.update({
        "architecture": {
            "model_type": config.get("model_type", "llama"),
            "architectures": config.get("architectures") or [],
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
            "hidden_act": cfg.hidden_act, "tie_word_embeddings": cfg.tie_word_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings,
        },
        "parameters": {"body": body, "embedding": embedding, "head": head, "norms": norms,
                       "total": body + embedding + head + norms},
        "bits_per_weight": {
            "body": 8.0 * body_bytes / body if body else 0.0,
            # a tied head is the embedding table itself
            "head": 8.0 * (head_bytes if head else embed_bytes) / embedding if embedding else 0.0,
        },
        "weight_bytes": {"total": total_bytes, "body": body_bytes, "embedding": embed_bytes, "head": head_bytes,
                         "other": total_bytes - body_bytes - embed_bytes - head_bytes},
        "kv_bytes_per_token": kv_bytes_per_token(cfg),
    })
    if load:
        info["loaded"] = _loaded_summary(folder, registry)
    return info


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _loaded_summary(folder: Path, registry: FormatRegistry) -> dict:
    from bitserve.loader import load_model  # builds the model: only on request

    loaded = load_model(folder, device="cpu", dtype="auto", registry=registry, progress=False)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    return {
        "weight_bytes": loaded.weight_bytes,
        "body_bits_per_weight": 8.0 * sum(m.nbytes for m in layers) / max(1, weights),
        "layer_types": dict(Counter(type(m).__name__ for m in layers)),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render_inspection(info: dict) -> str:
    """Human-readable text for the dict of :func:`inspect_checkpoint`."""
    a, p, b, w = info["architecture"], info["parameters"], info["bits_per_weight"], info["weight_bytes"]
    fmt = info["format"] or f"unknown ({info.get('format_error', '')})"
    if info.get("format_description"):
        fmt += f" - {info['format_description']}"
    arch = ", ".join(a["architectures"]) or a["model_type"]
    lines = [
        f"checkpoint    {info['path']}",
        f"format        {fmt}",
        f"architecture  {arch} ({a['model_type']}): {a['num_layers']} layers, hidden {a['hidden_size']}, "
        f"intermediate {a['intermediate_size']}, heads {a['num_heads']}/{a['num_kv_heads']} kv "
        f"(head_dim {a['head_dim']}), vocab {a['vocab_size']}, {a['hidden_act']}, "
        f"{'tied' if a['tie_word_embeddings'] else 'untied'} embeddings, context {a['max_position_embeddings']}",
        f"parameters    {p['total'] / 1e6:.3f} M: body {p['body'] / 1e6:.3f} M, embedding "
        f"{p['embedding'] / 1e6:.3f} M, head {p['head'] / 1e6:.3f} M{' (tied)' if not p['head'] else ''}, "
        f"norms {p['norms'] / 1e6:.4f} M",
        f"bits/weight   body {b['body']:.3f}, head {b['head']:.3f} (on disk, scales included)",
        f"weight bytes  {_mb(w['total'])}: body {_mb(w['body'])}, embedding {_mb(w['embedding'])}, "
        f"head {_mb(w['head'])}, other {_mb(w['other'])}",
        "KV per token  " + ", ".join(f"{k} {v} B" if v is not None else f"{k} n/a"
                                     for k, v in info["kv_bytes_per_token"].items()),
    ]
    if "loaded" in info:
        ld = info["loaded"]
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(ld["layer_types"].items()))
        lines.append(f"in memory     {_mb(ld['weight_bytes'])}, linears {ld['body_bits_per_weight']:.3f} bits/weight "
                     f"({kinds})")
    return "\n".join(lines)


# -- CLI helpers (wired into server/cli.py by the lead) ------------------------------------------
def run_inspect(args: argparse.Namespace) -> int:
    from bitserve.demo import model_or_demo

    try:
        info = inspect_checkpoint(model_or_demo(args.path), load=args.load)
    except CheckpointError as e:
        print(f"bitserve: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else render_inspection(info))
    return 0
