"""The options of ``bitserve convert`` (importing this stays light: no torch).

``convert_targets.TARGETS`` implements the targets named here; a test keeps the two in step.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from bitserve.cli_args import add_dataclass_arguments

TARGET_NAMES = ("bitnet", "onebit", "fbi", "dual_binary", "dense")
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ConvertOptions:
    """Knobs of the quantizers (every field is a ``bitserve convert`` flag)."""

    group_size: int = field(default=128, metadata={"help": "dual_binary: input columns per scale group "
                                                           "(a multiple of 8 dividing every in_features)"})
    fdb_iters: int = field(default=8, metadata={"help": "dual_binary: least-squares / re-assignment rounds"})
    alpha_dtype: str = field(default="float16", metadata={"help": "dual_binary: dtype of alpha1/alpha2 "
                                                                  "(float32 is used when a bitnet source's scales "
                                                                  "do not fit it exactly)"})
    scale_dtype: str = field(default="bfloat16", metadata={"help": "bitnet: dtype of weight_scale"})
    svid_iters: int = field(default=500, metadata={"help": "onebit: power-iteration limit of the rank-1 SVID"})
    dense_dtype: str = field(default="bfloat16", metadata={"help": "dense: dtype of the dequantized weights"})

    def __post_init__(self):
        for name in ("alpha_dtype", "scale_dtype", "dense_dtype"):
            if getattr(self, name) not in FLOAT_DTYPE_NAMES:
                raise ValueError(f"{name} must be one of {sorted(FLOAT_DTYPE_NAMES)}, got {getattr(self, name)!r}")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        if self.fdb_iters < 0:
            raise ValueError(f"fdb_iters must be >= 0, got {self.fdb_iters}")
        if self.svid_iters < 1:
            raise ValueError(f"svid_iters must be >= 1, got {self.svid_iters}")


GGUF_TARGETS = {"gguf-tq2_0": "tq2_0", "gguf-tq1_0": "tq1_0", "gguf-i2_s": "i2_s"}


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bitserve convert SRC DST --to FORMAT [options]``."""
    parser.add_argument("src", help="source: a dense Hugging Face llama folder, a bitnet folder, or a ternary .gguf "
                                    "('demo': the bundled demo model)")
    parser.add_argument("dst", help="destination folder (created; must be empty unless --overwrite), "
                                    "or the .gguf file for the gguf-* targets")
    parser.add_argument("--to", required=True, choices=sorted(TARGET_NAMES) + sorted(GGUF_TARGETS),
                        help="target format (gguf-*: a ternary source -- a bitnet folder or a ternary .gguf -- written "
                             "losslessly as that GGUF type)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--max-shard-size", default="4GB", help="largest safetensors shard (default: 4GB)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_dataclass_arguments(parser, ConvertOptions)
