"""An example bitserve format plugin living outside the bitserve source tree (see docs/plugins.md)."""

from bitserve_ternary_int8.format import TernaryInt8Format, write_checkpoint

__all__ = ["TernaryInt8Format", "write_checkpoint"]
