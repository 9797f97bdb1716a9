"""The bundled demo model: a tiny BitNet b1.58 checkpoint trained on a synthetic chat task.

``DEMO_MODEL_PATH`` is a folder in Microsoft's bitnet-b1.58-2B-4T layout (packed uint8
ternary projections + bf16 ``weight_scale``; see ``docs``/FORMATS.md §1). It is produced
reproducibly by ``scripts/train_demo.py``; the task it was trained on (and its checker)
is :mod:`bitserve.demo.task`.

This module stays import-light on purpose (no torch).
"""

from __future__ import annotations

import pathlib

DEMO_MODEL_PATH: pathlib.Path = pathlib.Path(__file__).resolve().parent / "model"
# what the command line and LLM() take for the bundled model, wherever pip put it
DEMO_MODEL_NAME = "demo"


def model_or_demo(model: str | pathlib.Path | None) -> str:
    """``model`` as given, or the demo model's folder for an empty value or the name ``demo``
    (unless a file or folder called ``demo`` exists in the current folder: that one wins)."""
    model = str(model or "")
    if not model or (model == DEMO_MODEL_NAME and not pathlib.Path(model).exists()):
        return str(DEMO_MODEL_PATH)
    return model


__all__ = ["DEMO_MODEL_NAME", "DEMO_MODEL_PATH", "model_or_demo"]
