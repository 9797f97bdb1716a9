"""Assemble a served model from configs: load, size the KV cache, start the engine(s) in this
process or as Ray replicas."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from bitserve.config import EngineConfig, ModelLoadConfig, ReplicaConfig
from bitserve.demo import DEMO_MODEL_PATH, model_or_demo
from bitserve.engine.async_engine import AsyncEngine
from bitserve.engine.core import EngineCore
from bitserve.engine.output_processor import CompletionDelta
from bitserve.frontend import Frontend, ModelInfo
from bitserve.loader import LoadedModel, load_model, resolve_model_path
from bitserve.plugins.base import QuantLinear
from bitserve.replica import LocalReplica, Replica
from bitserve.router import RouterPolicy
from bitserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

@dataclass
class LoadedServingModel:
    path: Path
    tokenizer: Tokenizer
    loaded: LoadedModel
    eos_token_ids: tuple[int, ...]
    max_model_len: int


def load_serving_model(cfg: ModelLoadConfig, progress: bool | None = None) -> LoadedServingModel:
    path = resolve_model_path(model_or_demo(cfg.model), cfg.revision)
    tokenizer = Tokenizer(path)
    loaded = load_model(path, format=cfg.format, dtype=cfg.dtype, device=cfg.device, progress=progress,
                        int8_lm_head=cfg.int8_lm_head)
    mc = loaded.config
    eos = tuple(dict.fromkeys(mc.eos_token_ids + tokenizer.eos_token_ids))
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return LoadedServingModel(path, tokenizer, loaded, eos, max_len)


def build_core(model: LoadedServingModel, engine_cfg: EngineConfig, seed: int = 0) -> EngineCore:
    return EngineCore(model.loaded.model, engine_cfg, max_model_len=model.max_model_len,
                      eos_token_ids=model.eos_token_ids, default_seed=seed)


def linear_bits_per_weight(loaded: LoadedModel) -> float:
    """Stored bits per weight over all linear layers (scales included)."""
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    return 8.0 * sum(m.nbytes for m in layers) / max(1, weights)


def model_info(model: LoadedServingModel, core: EngineCore, name: str) -> ModelInfo:
    mc, hf = model.loaded.config, model.loaded.hf_config
    return ModelInfo(
        name=name,
        architecture=(hf.get("architectures") or [mc.model_type])[0],
        format=model.loaded.plugin.name,
        bits_per_weight=linear_bits_per_weight(model.loaded),
        max_context=model.max_model_len,
        kv_cache_dtype=core.spec.dtype,
        vocab_size=mc.vocab_size,
        weight_bytes=model.loaded.weight_bytes,
        kv_bytes_per_token=core.spec.bytes_per_token,
        kv_capacity_tokens=core.blocks.num_blocks * core.spec.block_size,
        num_layers=mc.num_layers,
        hidden_size=mc.hidden_size,
        max_request_tokens=min(model.max_model_len, core.blocks.num_blocks * core.spec.block_size),
    )


def warn_if_kv_cache_short(info: ModelInfo) -> None:
    """A KV cache smaller than one full context is served (vLLM refuses to start), with a warning:
    requests are capped (default max_tokens) or refused (explicit max_tokens) at its size."""
    if info.max_request_tokens < info.max_context:
        log.warning("the KV cache holds %d tokens per engine, less than one full context of %d: requests are "
                    "limited to %d tokens (prompt + output); raise --num-kv-blocks / --gpu-memory-utilization or "
                    "lower --max-model-len", info.max_request_tokens, info.max_context, info.max_request_tokens)


def served_name(path: Path, served_model_name: str | None) -> str:
    if served_model_name:
        return served_model_name
    return "bitserve-demo" if path.resolve() == DEMO_MODEL_PATH.resolve() else path.name


@dataclass
class App:
    """What a server process serves: the frontend over its replica(s). ``model`` is the loaded
    model when the engine runs in this process, None when it runs in Ray replicas."""

    frontend: Frontend
    replica: Replica
    model: LoadedServingModel | None

    @property
    def info(self) -> ModelInfo:
        return self.frontend.info

    def shutdown(self) -> None:
        self.replica.shutdown()


def build_app(
    load_cfg: ModelLoadConfig,
    engine_cfg: EngineConfig,
    served_model_name: str | None = None,
    on_finish: Callable[[CompletionDelta], None] | None = None,
    progress: bool | None = None,
    replica_cfg: ReplicaConfig | None = None,
    router_policy: RouterPolicy | None = None,
) -> App:
    """The in-process engine (default), or ``replica_cfg.replicas`` Ray replicas when
    ``replica_cfg.uses_ray`` (this process then keeps only the tokenizer)."""
    if replica_cfg is not None and replica_cfg.uses_ray:
        return _build_ray_app(load_cfg, engine_cfg, replica_cfg, served_model_name, on_finish, router_policy)
    model = load_serving_model(load_cfg, progress=progress)
    core = build_core(model, engine_cfg, load_cfg.seed)
    replica = LocalReplica(AsyncEngine(core))
    frontend = Frontend(model.tokenizer, replica, model_info(model, core, served_name(model.path, served_model_name)),
                        on_finish=on_finish)
    warn_if_kv_cache_short(frontend.info)
    return App(frontend, replica, model)


def _build_ray_app(load_cfg, engine_cfg, replica_cfg, served_model_name, on_finish, router_policy) -> App:
    from bitserve.replica_ray import RayReplicaGroup
    from bitserve.replica_set import ReplicaSet

    path = resolve_model_path(model_or_demo(load_cfg.model), load_cfg.revision)
    tokenizer = Tokenizer(path)
    # a local folder travels as an absolute path; a hub repo id as itself (each node resolves it)
    local = bool(load_cfg.model) and Path(load_cfg.model).expanduser().is_dir()
    replica_load = replace(load_cfg, model=str(path.resolve())) if local else load_cfg
    group = RayReplicaGroup.start(replica_load, engine_cfg, replica_cfg)
    try:
        boots = group.wait_ready()
    except BaseException:
        for member in group.members:
            member.shutdown()
        group.close()
        raise
    first = boots[0]
    limits = replace(first.limits, num_kv_blocks=min(b.limits.num_kv_blocks for b in boots))
    info = replace(first.info, name=served_name(path, served_model_name),
                   kv_capacity_tokens=sum(b.info.kv_capacity_tokens for b in boots),
                   max_request_tokens=min(b.info.max_request_tokens for b in boots))
    warn_if_kv_cache_short(info)
    replicas = ReplicaSet(group.members, limits, router_policy, on_shutdown=group.close)
    return App(Frontend(tokenizer, replicas, info, on_finish=on_finish), replicas, None)
