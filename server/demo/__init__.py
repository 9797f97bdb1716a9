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

__all__ = ["DEMO_MODEL_PATH"]
