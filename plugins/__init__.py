"""Format plugins: the FormatPlugin API, the entry-point registry and built-in formats."""

from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import CheckpointError, CheckpointReader
from bitserve.plugins.registry import ENTRY_POINT_GROUP, FormatRegistry, UnknownFormatError

__all__ = [
    "ENTRY_POINT_GROUP",
    "CheckpointError",
    "CheckpointReader",
    "FormatPlugin",
    "FormatRegistry",
    "LinearSpec",
    "QuantLinear",
    "UnknownFormatError",
]
