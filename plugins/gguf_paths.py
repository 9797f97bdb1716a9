"""Which GGUF file a model path means (no ``gguf`` import, so callers can ask cheaply)."""

from __future__ import annotations

from pathlib import Path

from bitserve.plugins.checkpoint import CheckpointError


def find_gguf(path: str | Path) -> Path | None:
    """The path itself when it is a ``.gguf`` file; the single ``.gguf`` in a folder that holds no
    ``*.safetensors``; None otherwise (a safetensors checkpoint, or no GGUF at all)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                              "pass the path of the one to load")
    return found[0] if found else None
