"""Format discovery: entry points, detection, explicit override, third-party plugins."""

import json
import logging
from importlib.metadata import EntryPoint, entry_points

import pytest
import torch
from safetensors.torch import save_file

from bitserve.loader import load_model
from bitserve.plugins import registry as registry_mod
from bitserve.plugins.bitnet import BitNetFormat, TernaryLinear
from bitserve.plugins.checkpoint import CheckpointReader
from bitserve.plugins.dense import DenseFormat, DenseLinear
from bitserve.plugins.registry import ENTRY_POINT_GROUP, FormatRegistry, UnknownFormatError
from tiny_checkpoints import bitnet_config, random_bitnet_state, write_bitnet_checkpoint, write_llama_checkpoint


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("dense") / "llama", num_hidden_layers=1)


@pytest.fixture(scope="module")
def bitnet_folder(tmp_path_factory):
    config = bitnet_config(num_hidden_layers=1)
    return write_bitnet_checkpoint(tmp_path_factory.mktemp("bitnet") / "ckpt", config, random_bitnet_state(config, 1))


def _detect(folder, registry=None):
    registry = registry or FormatRegistry()
    config = json.loads((folder / "config.json").read_text())
    reader = CheckpointReader(folder)
    return registry.detect(config, reader.names(), reader)


def test_entry_points_installed():
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("dense") == "bitserve.plugins.dense:DenseFormat"
    assert eps.get("bitnet") == "bitserve.plugins.bitnet:BitNetFormat"
    reg = FormatRegistry()
    assert {"dense", "bitnet"} <= set(reg.names())
    assert type(reg.get("bitnet")) is BitNetFormat and type(reg.get("dense")) is DenseFormat
    assert reg.get("bitnet").name == "bitnet" and reg.get("dense").name == "dense"


def test_detection(dense_folder, bitnet_folder):
    assert _detect(bitnet_folder).name == "bitnet"
    assert _detect(dense_folder).name == "dense"
    loaded = load_model(bitnet_folder, device="cpu", dtype="float32")
    assert loaded.plugin.name == "bitnet"
    assert isinstance(loaded.model.model.layers[0].self_attn.qkv_proj, TernaryLinear)


def test_bitnet_detected_for_llama_model_type(tmp_path):
    # HF1BitLLM-style: model_type llama + quant_method bitnet is still bitnet (FORMATS.md §1.1)
    config = bitnet_config(num_hidden_layers=1)
    folder = write_bitnet_checkpoint(tmp_path / "c", config, random_bitnet_state(config, 2), linear_class="bitlinear")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert _detect(folder).name == "bitnet"


def test_explicit_override(dense_folder):
    loaded = load_model(dense_folder, format="dense", device="cpu", dtype="float32")
    assert loaded.plugin.name == "dense"
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, DenseLinear)
    with pytest.raises(UnknownFormatError) as err:
        load_model(dense_folder, format="nope", device="cpu")
    msg = str(err.value)
    assert "nope" in msg and "bitnet" in msg and "dense" in msg


def test_unclaimed_checkpoint(tmp_path):
    folder = tmp_path / "gptq"
    folder.mkdir()
    cfg = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2,
               quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32})
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = {
        "model.layers.0.self_attn.q_proj.qweight": torch.zeros(8, 64, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(2, 8, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.scales": torch.ones(2, 64, dtype=torch.float16),
        "model.embed_tokens.weight": torch.zeros(96, 64),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UnknownFormatError) as err:
        load_model(folder, device="cpu")
    msg = str(err.value)
    assert "gptq" in msg and "bitnet" in msg and "dense" in msg and str(folder) in msg


class MyFormat(DenseFormat):
    """A third-party plugin that claims plain llama checkpoints ahead of ``dense``."""

    name = "mine"
    priority = 50


class LowFormat(DenseFormat):
    """Claims everything, but ranks below bitnet."""

    name = "low"
    priority = 5

    def detect(self, config, tensor_names, reader):
        return True


def test_third_party_plugin_by_priority(dense_folder, bitnet_folder):
    reg = FormatRegistry({"dense": DenseFormat, "bitnet": BitNetFormat, "mine": MyFormat, "low": LowFormat})
    assert reg.names() == ["bitnet", "dense", "low", "mine"]
    loaded = load_model(dense_folder, registry=reg, device="cpu", dtype="float32")
    assert loaded.plugin.name == "mine" and type(loaded.plugin) is MyFormat
    # a lower-priority plugin does not steal a checkpoint bitnet claims
    assert _detect(bitnet_folder, reg).name == "bitnet"
    # but does take one nobody with higher priority claims
    assert _detect(dense_folder, FormatRegistry({"dense": DenseFormat, "low": LowFormat})).name == "low"
    # and is usable by name
    assert type(reg.get("mine")) is MyFormat


def installed(monkeypatch, *targets: tuple[str, str]) -> list[dict]:
    """Make the registry see these ``(entry point name, "module:attr")`` plugins as installed;
    returns the list of the registry's entry_points() calls."""
    fakes = [EntryPoint(name, target, ENTRY_POINT_GROUP) for name, target in targets]
    calls = []

    def fake_entry_points(**kwargs):
        calls.append(kwargs)
        return fakes if kwargs.get("group") == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry_mod, "entry_points", fake_entry_points)
    return calls


def test_broken_entry_point_is_skipped(monkeypatch, caplog):
    calls = installed(monkeypatch, ("broken", "bitserve_no_such_module_xyz:Plugin"), ("notaplugin", "json:dumps"),
                      ("raises", "bitserve.plugins.registry:NoSuchAttribute"),
                      ("dense", "bitserve.plugins.dense:DenseFormat"), ("bitnet", "bitserve.plugins.bitnet:BitNetFormat"),
                      ("dense", "bitserve_no_such_module_xyz:Dup"))  # the last: a duplicate name
    with caplog.at_level(logging.WARNING, logger=registry_mod.__name__):
        reg = FormatRegistry()
    assert calls, "the registry did not consult entry points"
    assert reg.names() == ["bitnet", "dense"]
    assert type(reg.get("dense")) is DenseFormat
    text = caplog.text
    assert "broken" in text and "notaplugin" in text and "raises" in text
    with pytest.raises(UnknownFormatError, match="'broken' is installed but failed to import .*ModuleNotFoundError"
                                                 ".*usable formats: bitnet, dense"):
        reg.get("broken")
    with pytest.raises(UnknownFormatError, match="unknown format 'nope'; installed formats: bitnet, dense"):
        reg.get("nope")


class RenamedFormat(DenseFormat):
    name = "renamed_cls"


class OtherDense(DenseFormat):
    pass  # name "dense": a second plugin claiming an installed name


def test_format_name_is_the_plugin_class_name(monkeypatch, caplog):
    """--format takes the class's ``name`` (docs/plugins.md), whatever the entry point is called."""
    installed(monkeypatch, ("dense", "bitserve.plugins.dense:DenseFormat"), ("renamed_ep", f"{__name__}:RenamedFormat"),
              ("dense2", f"{__name__}:OtherDense"))
    with caplog.at_level(logging.WARNING, logger=registry_mod.__name__):
        reg = FormatRegistry()
    assert reg.names() == ["dense", "renamed_cls"]
    assert type(reg.get("renamed_cls")) is RenamedFormat and type(reg.get("dense")) is DenseFormat
    assert "use --format renamed_cls" in caplog.text and "'dense2'" in caplog.text and "already provided" in caplog.text


class Incomplete(registry_mod.FormatPlugin):
    """Forgets load_linear."""

    name = "incomplete"
    priority = 100

    def detect(self, config, tensor_names, reader):
        return True


class DetectRaises(DenseFormat):
    name = "detect_raises"
    priority = 100

    def detect(self, config, tensor_names, reader):
        return config["no_such_key"]  # KeyError


class LoadRaises(DenseFormat):
    name = "load_raises"
    priority = 100

    def load_linear(self, reader, specs, *, device, dtype):
        return torch.zeros(3).expand(4, 5)  # a torch RuntimeError deep in the plugin


class InitRaises(DenseFormat):
    name = "init_raises"

    def __init__(self, config=None):
        raise RuntimeError("cannot start")


def test_a_broken_plugin_does_not_break_other_formats(monkeypatch, caplog, dense_folder, bitnet_folder):
    """docs/plugins.md: a broken third-party package cannot stop bitserve from loading other formats.
    A plugin class with unimplemented methods is ignored at discovery; one whose detect raises is
    skipped (with a warning naming it) while the others claim the checkpoint."""
    installed(monkeypatch, ("dense", "bitserve.plugins.dense:DenseFormat"), ("bitnet", "bitserve.plugins.bitnet:BitNetFormat"),
              ("incomplete", f"{__name__}:Incomplete"), ("detect_raises", f"{__name__}:DetectRaises"))
    with caplog.at_level(logging.WARNING, logger=registry_mod.__name__):
        reg = FormatRegistry()
        assert reg.names() == ["bitnet", "dense", "detect_raises"]
        assert "'incomplete'" in caplog.text and "does not implement load_linear" in caplog.text
        assert _detect(bitnet_folder, reg).name == "bitnet"
        assert load_model(dense_folder, registry=reg, device="cpu", dtype="float32").plugin.name == "dense"
    assert "'detect_raises'" in caplog.text and "failed in detect (KeyError" in caplog.text


def test_plugin_failures_name_the_plugin(dense_folder):
    """A plugin's own error that is not a CheckpointError reaches the user as PluginError (a
    ValueError: the CLI prints it without a traceback) naming the plugin, the layer and the path."""
    reg = FormatRegistry({"dense": DenseFormat, "load_raises": LoadRaises, "init_raises": InitRaises})
    with pytest.raises(registry_mod.PluginError, match=r"format plugin 'load_raises' failed to load "
                                                       r"model\.layers\.0\.self_attn\.q_proj.*RuntimeError") as err:
        load_model(dense_folder, registry=reg, device="cpu", dtype="float32")
    assert str(dense_folder) in str(err.value)
    with pytest.raises(registry_mod.PluginError, match=r"'init_raises' .*failed to start: RuntimeError: cannot start"):
        reg.get("init_raises")


class ImpostorBitNet(DenseFormat):
    """A third-party class claiming the built-in name "bitnet"."""

    name = "bitnet"


def test_a_built_in_format_keeps_its_name(monkeypatch, caplog, bitnet_folder):
    """A third-party plugin met first (earlier on sys.path) under a built-in's name does not
    replace the built-in: it is the one ignored, with a warning naming its entry point."""
    installed(monkeypatch, ("impostor", f"{__name__}:ImpostorBitNet"), ("bitnet", "bitserve.plugins.bitnet:BitNetFormat"),
              ("dense", "bitserve.plugins.dense:DenseFormat"))
    with caplog.at_level(logging.WARNING, logger=registry_mod.__name__):
        reg = FormatRegistry()
    assert type(reg.get("bitnet")) is BitNetFormat
    assert "'impostor'" in caplog.text and "already provided by bitserve.plugins.bitnet.BitNetFormat" in caplog.text
    assert _detect(bitnet_folder, reg).name == "bitnet"


class WrongShape(DenseFormat):
    name = "wrong_shape"
    priority = 100

    def load_linear(self, reader, specs, *, device, dtype):
        layer = super().load_linear(reader, specs, device=device, dtype=dtype)
        layer.out_features += 1  # claims one output too many
        return layer


class NotAQuantLinear(DenseFormat):
    name = "plain_linear"
    priority = 100

    def load_linear(self, reader, specs, *, device, dtype):
        return torch.nn.Linear(specs[0].in_features, sum(s.out_features for s in specs))


class OverridesRaise(DenseFormat):
    name = "overrides_raise"
    priority = 100

    def model_overrides(self, config):
        raise RuntimeError("no overrides today")


class OverridesUnknown(DenseFormat):
    name = "overrides_unknown"
    priority = 100

    def model_overrides(self, config):
        return {"not_a_field": 1}


class LoadValueError(DenseFormat):
    name = "load_value_error"
    priority = 100

    def load_linear(self, reader, specs, *, device, dtype):
        raise ValueError("odd tensor")


@pytest.mark.parametrize("plugin,words", [
    (WrongShape, r"'wrong_shape' returned a layer of \d+ x \d+ \(out x in\); the model needs"),
    (NotAQuantLinear, r"'plain_linear' returned a Linear, not a QuantLinear"),
    (OverridesRaise, r"'overrides_raise' failed in model_overrides: RuntimeError: no overrides today"),
    (OverridesUnknown, r"'overrides_unknown' failed in model_overrides: ValueError: unknown ModelConfig override"),
    (LoadValueError, r"'load_value_error' failed to load model\.layers\.0\.self_attn\.q_proj.*ValueError: odd tensor"),
])
def test_what_a_plugin_returns_or_raises_is_checked_and_named(dense_folder, plugin, words):
    """A third-party plugin's layer of the wrong shape or type fails at load (it loaded, then broke
    the first forward pass), and its errors in model_overrides or load_linear name the plugin."""
    reg = FormatRegistry({"dense": DenseFormat, plugin.name: plugin})
    with pytest.raises(registry_mod.PluginError, match=words):
        load_model(dense_folder, registry=reg, device="cpu", dtype="float32")
