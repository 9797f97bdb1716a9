"""User-facing configuration. Field names are the CLI flags (``--max-model-len``)
and the Helm values; :mod:`bitserve.cli_args` turns these dataclasses into
argparse options."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelLoadConfig:
    model: str = field(default="", metadata={"help": "checkpoint folder or Hugging Face repo id (default: the bundled demo model)"})
    format: str | None = field(default=None, metadata={"help": "force a format plugin by name instead of detecting it"})
    dtype: str = field(default="auto", metadata={"help": "activation/parameter dtype: auto, float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (cuda when available)"})
    revision: str | None = field(default=None, metadata={"help": "Hugging Face revision when model is a repo id"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length cap (default: the model's)"})
    seed: int = field(default=0, metadata={"help": "seed for requests that give none"})

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")
