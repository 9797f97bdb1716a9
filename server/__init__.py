"""bitserve: an inference server for extreme low-bit LLMs (ternary, binary, dual-binary).

``from bitserve import LLM, SamplingParams`` is the offline API. Importing the
package is cheap: torch and the model code load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from bitserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from bitserve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'bitserve' has no attribute {name!r}")
