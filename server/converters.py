"""``bitserve convert``: turn a checkpoint folder into another bit format.

From a dense Hugging Face llama folder (safetensors) to ``bitnet`` (absmean ternary, 2B4T offline
layout), ``onebit`` (SVID rank-1 start in OneBit's packed layout), ``fbi`` (latent weights and
per-column alpha/beta) or ``dual_binary`` (DB-LLM flexible dual binarization, bitserve's layout);
from a ``bitnet`` folder to ``dual_binary`` exactly. Layouts: FORMATS.md and docs/formats_lowbit.md.

    from bitserve.converters import convert_checkpoint
    report = convert_checkpoint("llama-dense", "llama-db", to="dual_binary", group_size=64)

The CLI wiring is two calls: ``add_convert_arguments(subparser)`` and ``run_convert(args)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bitserve.cli_args import dataclass_from_args
from bitserve.convert_source import SourceCheckpoint
from bitserve.convert_options import GGUF_TARGETS, ConvertOptions, add_convert_arguments  # noqa: F401
from bitserve.convert_targets import TARGETS
from bitserve.convert_writer import ShardWriter, copy_side_files, parse_size, publish, staging_folder
from bitserve.loader import open_checkpoint
from bitserve.plugins.checkpoint import CheckpointError
from bitserve.plugins.registry import FormatRegistry
from bitserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    source: Path
    destination: Path
    source_format: str
    target: str
    num_linears: int
    source_bytes: int  # tensor bytes read
    written_bytes: int  # tensor bytes written
    files: list[str]
    errors: dict[str, float] = field(default_factory=dict)  # relative ||W - W_hat|| per projection

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def summary(self) -> str:
        return (f"{self.source} ({self.source_format}) -> {self.destination} ({self.target}): {self.num_linears} "
                f"linears, {self.source_bytes / 1e6:.1f} MB -> {self.written_bytes / 1e6:.1f} MB of tensors, "
                f"relative weight error mean {self.mean_error:.4f} max {self.max_error:.4f}")


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, progress: bool = True, *,
                       overwrite: bool = False, max_shard_size: str | int = "4GB",
                       registry: FormatRegistry | None = None, **opts) -> ConvertReport:
    """Convert the checkpoint folder ``src`` into format ``to`` in the new folder ``dst``.

    ``opts`` are :class:`~bitserve.convert_targets.ConvertOptions` fields (``group_size``,
    ``fdb_iters``, ``alpha_dtype``, ``scale_dtype``, ``svid_iters``). Raises CheckpointError
    (naming the file and tensor) for sources or shapes a target cannot take; ``dst`` only appears
    once the conversion is complete.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if to not in TARGETS:
        raise ValueError(f"unknown conversion target '{to}' (choose from {', '.join(sorted(TARGETS))})")
    unknown = set(opts) - {f.name for f in dataclasses.fields(ConvertOptions)}
    if unknown:
        raise TypeError(f"unknown conversion option(s) {sorted(unknown)}")
    if not src.exists():
        raise CheckpointError(f"{src}: checkpoint folder does not exist")
    if dst == src or src in dst.parents:
        raise ValueError(f"{dst}: the destination must not be the source folder or inside it")
    if dst in src.parents:  # --overwrite would delete the source with the folder that holds it
        raise ValueError(f"{dst}: the destination must not contain the source folder ({src})")
    if dst == Path.cwd() or dst in Path.cwd().parents:
        raise ValueError(f"{dst}: the destination must not be the current folder or one above it")
    target = TARGETS[to](ConvertOptions(**opts))
    reader, config = open_checkpoint(src)  # a safetensors / .bin folder, or a GGUF file
    source = SourceCheckpoint(src, config, registry, reader=reader)
    target.check(source)
    source.check_loadable()
    config = target.config(source)

    stage = staging_folder(dst, overwrite)
    try:
        writer = ShardWriter(stage, parse_size(max_shard_size))
        for name in source.passthrough:
            writer.add(name, source.passthrough_tensor(name))
        errors = {}
        bar = tqdm(source.specs, desc=f"convert {src.name} -> {to}", unit="linear", disable=not progress)
        for spec in bar:
            tensors, err = target.linear(spec, source.projection(spec), source)
            tensors.update(source.extras(spec))
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            errors[spec.prefix] = err
        files = writer.close()
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if source.container == "gguf":
            Tokenizer(src).save_pretrained(stage)  # the GGUF's own vocabulary and chat template
        else:
            copy_side_files(src, stage)
        publish(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    report = ConvertReport(src, dst, source.format, to, len(source.specs), source.reader.nbytes(),
                           writer.total_bytes, files, errors)
    log.info("%s", report.summary())
    return report


# -- CLI helpers (wired into server/cli.py by the lead) ------------------------------------------
def _run_gguf(args: argparse.Namespace) -> int:
    from bitserve.convert_gguf import write_gguf

    dst, src = Path(args.dst), Path(args.src)
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the destination must not be the source")
    if src.is_dir() and dst.resolve().is_relative_to(src.resolve()):  # a second .gguf there breaks the source
        raise ValueError(f"{dst}: the destination must not be inside the source folder {src}")
    if dst.is_dir():
        raise ValueError(f"{dst}: is a folder; the GGUF destination is a file path (e.g. {dst / 'model.gguf'})")
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite to replace it)")
    write_gguf(args.src, dst, linear_type=GGUF_TARGETS[args.to], progress=args.progress)
    print(f"{args.src} -> {dst} ({args.to}, {dst.stat().st_size / 1e6:.1f} MB)")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; prints the summary; returns the exit code."""
    from bitserve.demo import model_or_demo

    args.src = model_or_demo(args.src)
    try:
        if args.to in GGUF_TARGETS:
            return _run_gguf(args)
        opts = dataclasses.asdict(dataclass_from_args(ConvertOptions, args))
        report = convert_checkpoint(args.src, args.dst, args.to, progress=args.progress, overwrite=args.overwrite,
                                    max_shard_size=args.max_shard_size, **opts)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"bitserve: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
