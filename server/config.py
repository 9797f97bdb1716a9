"""User-facing configuration. Field names are the CLI flags (``--max-model-len``)
and the Helm values; :mod:`bitserve.cli_args` turns these dataclasses into
argparse options."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

KV_DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32", "int8", "int4", "int2")


@dataclass
class ModelLoadConfig:
    model: str = field(default="", metadata={"help": "checkpoint folder or Hugging Face repo id (default, or 'demo': the bundled demo model)"})
    format: str | None = field(default=None, metadata={"help": "force a format plugin by name instead of detecting it"})
    dtype: str = field(default="auto", metadata={"help": "activation/parameter dtype: auto, float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (cuda when available)"})
    revision: str | None = field(default=None, metadata={"help": "Hugging Face revision when model is a repo id"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length cap (default: the model's)"})
    seed: int = field(default=0, metadata={"help": "seeds the per-request seeds of requests that set none (each gets its own; a fresh run repeats)"})
    int8_lm_head: bool = field(default=False, metadata={
        "help": "quantize the LM head to int8 per row at load (half its bytes; logits move slightly)"})

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")


@dataclass
class EngineConfig:
    block_size: int | None = field(default=None, metadata={
        "help": "tokens per KV-cache block (default 16; 64 for int4/int2, whose key scales are per block)"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one step"})
    max_num_batched_tokens: int = field(default=1024, metadata={"help": "token budget of one step (prefill chunks + decodes)"})
    max_queue: int = field(default=1024, metadata={"help": "most waiting requests; more are refused"})
    scheduling_policy: str = field(default="fcfs", metadata={"help": "fcfs or priority (lower value first)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "share KV blocks of equal prefixes"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV-cache storage: auto (model dtype), bf16, fp16, fp32, int8 (per-token scales), int4/int2 "
                "(keys per channel per block, values per token; docs/kv_cache.md)"})
    kv_pre_rope_keys: bool = field(default=False, metadata={
        "help": "int4/int2: quantize keys before RoPE and rotate them after dequantization (KVQuant)"})
    kv_sink_tokens: int = field(default=0, metadata={
        "help": "int4/int2: keep the keys and values of each sequence's first N tokens in full precision "
                "(attention sinks; costs 2N full-precision tokens per block)"})
    kv_cache_memory_mb: int | None = field(
        default=None, metadata={"help": "KV-cache budget in MiB (default: enough for max_num_seqs full contexts "
                                        "on CPU, capped at 2 GiB; gpu_memory_utilization of free memory on CUDA)"})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "exact number of KV blocks (overrides the budget)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "fraction of free GPU memory for the KV cache"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "never replay CUDA graphs: run every step's kernels one by one (by default decode steps of up to "
                "max_num_seqs (at most 256) sequences replay graphs captured at start-up on CUDA)"})
    piecewise_graph_tokens: int = field(default=0, metadata={
        "help": "on CUDA, replay mixed and prefill steps of up to this many tokens from piecewise CUDA graphs "
                "(the forward captured per padded token count, split at the attention calls, which run eagerly); "
                "0: off (the default until it has been timed on a GPU); e.g. 512"})

    def __post_init__(self):
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_dtype not in KV_DTYPE_CHOICES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPE_CHOICES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_pre_rope_keys and self.kv_cache_dtype not in ("int4", "int2"):
            raise ValueError("kv_pre_rope_keys applies to kv_cache_dtype int4/int2 only")
        if self.kv_sink_tokens < 0:
            raise ValueError(f"kv_sink_tokens must be >= 0, got {self.kv_sink_tokens}")
        if self.kv_sink_tokens and self.kv_cache_dtype not in ("int4", "int2"):
            raise ValueError("kv_sink_tokens applies to kv_cache_dtype int4/int2 only")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if self.piecewise_graph_tokens < 0:
            raise ValueError(f"piecewise_graph_tokens must be >= 0, got {self.piecewise_graph_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_mb is not None and self.kv_cache_memory_mb < 1:
            raise ValueError(f"kv_cache_memory_mb must be >= 1, got {self.kv_cache_memory_mb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class ReplicaConfig:
    """Where the engines run: in this process (default) or as Ray actors (docs/ray.md)."""

    replicas: int = field(default=1, metadata={
        "help": "engine replicas; more than 1 (or --ray-address) runs them as Ray actors behind this front end"})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join ('auto' or the head's host:port) or 'local' for a new loopback-only Ray "
                "instance on this machine (default: $RAY_ADDRESS if set, else 'local')"})
    gpus_per_replica: float | None = field(default=None, metadata={
        "help": "GPUs each replica reserves (fractions share a GPU; default: 0 with --device cpu, 1 with "
                "--device cuda... or when joining a cluster, else 1 if the local Ray instance has GPUs)"})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "CPUs each replica reserves"})

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("ray_address must not be empty")
        if self.ray_address is not None and self.ray_address.startswith("ray://"):
            raise ValueError("ray_address: Ray Client (ray://) cannot carry the replicas' streaming generators; "
                             "run bitserve serve on a node of the cluster with --ray-address auto (or the "
                             "head's host:port)")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        if self.cpus_per_replica < 0:
            raise ValueError(f"cpus_per_replica must be >= 0, got {self.cpus_per_replica}")

    @property
    def uses_ray(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None


@dataclass
class ServerConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    metrics_port: int = field(default=9400, metadata={"help": "Prometheus /metrics port (0 = any free port, -1 = off)"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name clients use (default: folder name)"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request sets none"})
    max_concurrent_streams: int = field(default=512, metadata={"help": "generation calls in flight at once; more get RESOURCE_EXHAUSTED (health, reflection, Abort and GetLoad are not counted)"})
    max_message_mb: int = field(default=16, metadata={"help": "largest gRPC message, MiB"})
    keepalive_time_s: int = field(default=30, metadata={"help": "HTTP/2 keepalive ping interval"})
    keepalive_timeout_s: int = field(default=10, metadata={"help": "keepalive ping ack timeout"})
    grace_period_s: float = field(default=30.0, metadata={"help": "on SIGTERM, how long in-flight streams may finish"})
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate chain (enables TLS with --tls-key)"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key"})
    api_token: str | None = field(default=None, metadata={"help": "require 'authorization: Bearer TOKEN' "
                                                                  "(default: $BITSERVE_API_TOKEN if set)"})

    def check_files(self) -> None:
        """Raise OSError naming the flag when a TLS file cannot be read (before a model loads)."""
        for flag, name in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if name is not None and not (Path(name).is_file() and os.access(name, os.R_OK)):
                raise OSError(f"{flag} {name}: not a readable file")

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1, got {self.max_concurrent_streams}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0: any free port), got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535 (0: any free port) or -1 (off), got {self.metrics_port}")
        for name in ("max_message_mb", "keepalive_time_s", "keepalive_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
