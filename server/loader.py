"""Load a checkpoint into a ready model: config, format plugin, linears, tensors.

A checkpoint is a Hugging Face folder (``config.json`` + safetensors) or a GGUF model: a
``.gguf`` file, or a folder holding exactly one ``.gguf`` and no safetensors. A GGUF file is
read through :class:`~bitserve.plugins.gguf_checkpoint.GGUFCheckpoint`, whose config comes from
the file's metadata; everything after that is the same path.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bitserve.model import LlamaForCausalLM
from bitserve.model_config import ModelConfig, check_overrides, token_ids
from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader, read_json_object, require_finite
from bitserve.plugins.gguf_paths import find_gguf
from bitserve.plugins.registry import FormatRegistry, PluginError, is_builtin

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    plugin: FormatPlugin
    hf_config: dict
    path: Path
    weight_bytes: int  # bytes of every tensor the model holds
    checkpoint_bytes: int  # tensor bytes of the checkpoint files


def _hub_patterns(repo_id: str, revision: str | None) -> list[str]:
    """What to download from a Hub repo: its safetensors, else its ``pytorch_model*.bin`` (never both)."""
    from huggingface_hub import list_repo_files

    files = list_repo_files(repo_id, revision=revision)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
    return ["*.json", "*.jinja", *weights]


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local folder or ``.gguf`` file, or a Hugging Face repo id downloaded with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path
    if _REPO_ID.match(model) and not path.exists():
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(
                f"{model}: not a local folder, and huggingface_hub is not installed to download it"
            ) from None
        try:
            return Path(snapshot_download(model, revision=revision, allow_patterns=_hub_patterns(model, revision)))
        except Exception as e:
            raise CheckpointError(f"{model}: cannot download from the Hugging Face Hub: {e}") from e
    if path.exists():
        raise CheckpointError(f"{model}: not a checkpoint folder or a .gguf file")
    raise CheckpointError(f"{model}: checkpoint folder does not exist")


def _plugin_overrides(plugin: FormatPlugin, hf_config: dict, path: Path) -> dict:
    """``plugin.model_overrides(hf_config)``; a third-party plugin's failure names the plugin."""
    try:
        overrides = plugin.model_overrides(hf_config)
        check_overrides(overrides or {})
        return overrides
    except Exception as e:
        if isinstance(e, (CheckpointError, PluginError)) or is_builtin(type(plugin)):
            raise
        raise PluginError(f"{path}: format plugin '{plugin.name}' failed in model_overrides: "
                          f"{type(e).__name__}: {e}") from e


def check_plugin_layer(layer, specs: list[LinearSpec], plugin_name: str, where: str) -> None:
    """What a plugin's ``load_linear`` returned must be a QuantLinear of the requested shape (the
    specs' out_features summed, one in_features): anything else fails here, naming the plugin,
    instead of inside the first forward pass."""
    if not isinstance(layer, QuantLinear):
        raise PluginError(f"{where}: format plugin '{plugin_name}' returned a {type(layer).__name__}, "
                          f"not a QuantLinear")
    want_out, want_in = sum(s.out_features for s in specs), specs[0].in_features
    if (layer.out_features, layer.in_features) != (want_out, want_in):
        raise PluginError(f"{where}: format plugin '{plugin_name}' returned a layer of {layer.out_features} x "
                          f"{layer.in_features} (out x in); the model needs {want_out} x {want_in}")


def refuse_latent_bitnet(hf_config: dict, path: Path) -> None:
    """The community BitNet b1.58 reproductions (1bitLLM/bitnet_b1_58-*: ``BitnetForCausalLM``,
    ``model_type: llama``, ``weight_bits: 1``) store full-precision latent weights that their own
    code ternarizes at run time, with sub-norms named ``inner_attn_ln`` / ``ffn_layernorm``
    (FORMATS.md §1.1.5). Read as a plain dense Llama they load and answer, but not as the model
    they are: CheckpointError instead."""
    architectures = hf_config.get("architectures") or []
    if "BitnetForCausalLM" in architectures or hf_config.get("weight_bits") == 1:
        raise CheckpointError(
            f"{path}: a 1bitLLM-style BitNet b1.58 checkpoint (BitnetForCausalLM, weight_bits 1: latent weights "
            "ternarized at run time, sub-norms inner_attn_ln / ffn_layernorm) is not a format bitserve runs; it "
            "would load as a dense Llama and compute something else. Use a transformers 'bitnet' checkpoint "
            "(quantization_config.quant_method 'bitnet') or its GGUF")


def resolve_device(device: str) -> torch.device:
    """``auto``: cuda when available, else cpu. ValueError for a device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: bitserve runs on cpu or cuda")
    return dev


def resolve_dtype(dtype: str, hf_config: dict, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    chosen = _DTYPES.get(name) if isinstance(name, str) else None
    if chosen is None:
        log.warning("config.json: torch_dtype %r is not a float dtype bitserve computes in; using float32 "
                    "(--dtype picks one)", name)
        chosen = torch.float32
    if chosen == torch.float16 and device.type == "cpu":
        return torch.float32  # fp16 matmuls are slow and lossy on CPU
    return chosen


def load_model(
    path: str | Path,
    *,
    format: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    registry: FormatRegistry | None = None,
    progress: bool | None = None,
    int8_lm_head: bool = False,
) -> LoadedModel:
    """Read config.json, pick the format plugin, and build the model.

    Either returns a complete model or raises (CheckpointError naming the file
    and tensor, UnknownFormatError listing the installed formats).
    """
    path = Path(path)
    reader, hf_config = open_checkpoint(path)
    registry = registry or FormatRegistry()
    plugin = registry.get(format, hf_config) if format else registry.detect(hf_config, reader.names(), reader)
    if plugin.name == "dense" and not format:
        refuse_latent_bitnet(hf_config, path)
    cfg = ModelConfig.from_hf(hf_config, _plugin_overrides(plugin, hf_config, path), config_source(reader, path))
    check_layer_count(reader, cfg.num_layers, path)
    gen_path = path / "generation_config.json"
    if path.is_dir() and gen_path.exists():
        cfg = cfg.with_eos(token_ids(read_json_object(gen_path).get("eos_token_id"), f"{gen_path}: eos_token_id"))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, hf_config, dev)

    bar = tqdm(total=4 * cfg.num_layers, desc=f"loading {path.name} ({plugin.name})", unit="linear",
               disable=(not progress) if progress is not None else None, leave=False)

    def build_linear(specs):
        names = ", ".join(s.prefix for s in specs)
        try:
            layer = plugin.load_linear(reader, specs, device=dev, dtype=torch_dtype)
        except Exception as e:  # e.g. a torch shape error inside a plugin: say whose, and where
            if isinstance(e, (CheckpointError, PluginError, OSError)) or (isinstance(e, ValueError)
                                                                          and is_builtin(type(plugin))):
                raise  # they name the file and tensor (or the plugin) already
            raise PluginError(f"{path}: format plugin '{plugin.name}' failed to load {names}: "
                              f"{type(e).__name__}: {e}") from e
        check_plugin_layer(layer, specs, plugin.name, f"{path}: {names}")
        bar.update(1)
        return layer

    try:
        model = LlamaForCausalLM(cfg, build_linear)
    finally:
        bar.close()
    _load_dense_tensors(model, reader, dev, torch_dtype)
    _report_unused(reader, path)
    if int8_lm_head:
        model.quantize_lm_head()
    model.eval()
    _release_free_heap()
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers(recurse=True))
                       if t.device.type != "meta")
    log.info("loaded %s as %s: %d layers, %.1f MB of weights", path, plugin.name, cfg.num_layers, weight_bytes / 1e6)
    return LoadedModel(model, cfg, plugin, hf_config, path, weight_bytes, reader.nbytes())


def open_checkpoint(path: Path):
    """``(reader, config dict)`` of a safetensors folder or a GGUF model path."""
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        from bitserve.plugins.gguf_checkpoint import GGUFCheckpoint

        reader = GGUFCheckpoint(gguf_file)
        return reader, reader.config
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder or a .gguf file")
    hf_config = read_json_object(path / "config.json")
    qc = hf_config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config must be an object, not {qc!r}")
    return CheckpointReader(path), hf_config


def config_source(reader, path: Path) -> str:
    """Where the architecture of :func:`open_checkpoint`'s config came from, for error messages."""
    gguf_path = getattr(reader, "path", None)  # a GGUF's config is built from its metadata
    return f"{gguf_path} (metadata)" if gguf_path is not None else str(path / "config.json")


def _release_free_heap() -> None:
    """Give the heap pages freed by loading's transients back to the OS (glibc only).

    The per-linear temporaries (a few MB each) are freed between long-lived
    packed weights, so glibc keeps them as holes in the heap: ~0.2 GB of RSS
    for a 2B4T-sized model until ``malloc_trim`` returns them.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")


def check_layer_count(reader, num_layers: int, path: Path) -> None:
    """A checkpoint with tensors of more layers than config.json's ``num_hidden_layers`` (a GGUF's
    ``block_count``) is a mismatch, not something to run on a truncated stack: CheckpointError."""
    found = [int(m.group(1)) for m in map(_LAYER_TENSOR.match, reader.names()) if m]
    if found and max(found) >= num_layers:
        raise CheckpointError(f"{path}: the checkpoint has tensors of layer {max(found)} (model.layers.{max(found)}.*) "
                              f"but its config declares {num_layers} layer(s)")


_NEVER_READ = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # old checkpoints store the computed RoPE table


def _report_unused(reader, path: Path) -> None:
    """Warn about tensors no part of the model read (e.g. a bias the format ignores): the model
    is complete, but a checkpoint with such tensors is often not the one the user meant."""
    unused = sorted(n for n in reader.names() - reader.read_names if not _NEVER_READ.search(n))
    if unused:
        log.warning("%s: %d tensor(s) of the checkpoint are not used by the model: %s%s", path, len(unused),
                    ", ".join(unused[:8]), " ..." if len(unused) > 8 else "")


def _load_dense_tensors(model: LlamaForCausalLM, reader: CheckpointReader, device, dtype) -> None:
    """Fill the meta-device parameters (embeddings, norms, untied lm_head) from the checkpoint."""
    state = {}
    for name, param in model.named_parameters():
        if param.device.type != "meta":
            continue
        tensor = require_finite(reader.get(name, shape=tuple(param.shape), dtypes=FLOAT_DTYPES),
                                f"{reader.file_of(name)}: tensor '{name}'")
        state[name] = torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    # the rotary inverse frequencies are computed, not loaded
    model.model.rope.to(device)
