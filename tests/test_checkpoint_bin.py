"""CheckpointReader on PyTorch ``pytorch_model.bin`` folders (no safetensors): weights-only,
memory-mapped reading, sharded indexes, and errors that name the file."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bitserve.plugins.checkpoint import CheckpointError, CheckpointReader


def _state():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "a.weight": base,
        "a.transposed": base.t(),  # a non-contiguous view sharing base's storage
        "b.packed": torch.tensor([[70, -128]], dtype=torch.int8),
        "c.half": torch.ones(3, dtype=torch.bfloat16),
    }


def test_reads_names_dtypes_shapes_and_values(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert reader.names() == set(state)
    assert [reader.dtype(n) for n in sorted(state)] == ["F32", "F32", "I8", "BF16"]
    assert reader.shape("a.transposed") == (6, 4)
    for name, value in state.items():
        got = reader.get(name)
        assert got.dtype == value.dtype and torch.equal(got, value) and got.is_contiguous()
    assert reader.nbytes() == 24 * 4 * 2 + 2 + 3 * 2
    with pytest.raises(CheckpointError, match="'b.packed' has dtype I8, expected one of"):
        reader.get("b.packed", dtypes={"F32"})


def test_values_are_copies_of_the_mapped_file(tmp_path):
    torch.save(_state(), tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    first = reader.get("a.weight")
    first.zero_()
    assert reader.get("a.weight")[1, 1] == 7  # the caller's tensor owns its memory


def test_sharded_index(tmp_path):
    state = _state()
    torch.save({"a.weight": state["a.weight"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.packed": state["b.packed"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "pytorch_model-00001-of-00002.bin", "b.packed": "pytorch_model-00002-of-00002.bin"}}))
    reader = CheckpointReader(tmp_path)
    assert reader.names() == {"a.weight", "b.packed"}
    assert reader.file_of("b.packed") == tmp_path / "pytorch_model-00002-of-00002.bin"
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json: shard.*missing.*00002-of-00002.bin"):
        CheckpointReader(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match="tensor 'x' also appears in"):
        CheckpointReader(tmp_path)


def test_safetensors_win_over_bin(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    save_file({"x": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.file_of("x").name == "model.safetensors" and reader.get("x").tolist() == [1.0, 1.0]


def test_legacy_serialization_is_read(tmp_path):
    torch.save({"x": torch.arange(4.0)}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert CheckpointReader(tmp_path).get("x").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_truncated_file_fails_at_open(tmp_path):
    torch.save(_state(), tmp_path / "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=f"{path}: cannot read PyTorch weight file"):
        CheckpointReader(tmp_path)


class _RunsCode:
    """Unpickling this would create a file: weights-only loading must refuse it without running it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.ones(2), "evil": _RunsCode(marker)}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=f"{path}: refused to unpickle") as err:
        CheckpointReader(tmp_path)
    assert not marker.exists()
    # says what was refused (torch names the global), never that weights_only=False would load it
    assert "open" in str(err.value) and "weights_only=False" not in str(err.value)


def test_nested_state_dict_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"x": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match=f"{path}: entry 'model' is a dict, expected a tensor"):
        CheckpointReader(tmp_path)


def test_other_bin_files_are_not_weights(tmp_path):
    torch.save({"lr": torch.ones(1)}, tmp_path / "training_args.bin")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors \(or pytorch_model\*.bin\) weight files"):
        CheckpointReader(tmp_path)


def test_dense_bin_llama_is_detected_and_loads(tmp_path):
    """A plain llama in pytorch_model.bin is detected as dense (fakequant samples rows from .bin too)."""
    from binary_checkpoints import llama_config, projection_shapes, random_dense_parts, save_checkpoint

    from bitserve.loader import load_model

    config = llama_config()
    gen = torch.Generator().manual_seed(0)
    tensors = random_dense_parts(config, gen)
    for prefix, (n, k) in projection_shapes(config).items():
        tensors[f"{prefix}.weight"] = 0.2 * torch.randn(n, k, generator=gen)
    folder = save_checkpoint(tmp_path / "bin", config, tensors, save="bin")
    assert not list(folder.glob("*.safetensors"))
    loaded = load_model(folder, dtype="float32", device="cpu", progress=False)
    assert loaded.plugin.name == "dense"


def test_hub_download_patterns(monkeypatch):
    """Repo downloads take the safetensors when there are any, else the .bin weights, never both."""
    import huggingface_hub

    from bitserve.loader import _hub_patterns

    listing = {"a/st": ["config.json", "model.safetensors", "pytorch_model.bin"],
               "a/bin": ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"]}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: listing[repo])
    assert "*.safetensors" in _hub_patterns("a/st", None) and "pytorch_model*.bin" not in _hub_patterns("a/st", None)
    assert "pytorch_model*.bin" in _hub_patterns("a/bin", None) and "*.safetensors" not in _hub_patterns("a/bin", None)
    assert "*.json" in _hub_patterns("a/bin", None)
