"""Joining Ray from the serving process, and what each engine replica reserves there.

:class:`RaySession` joins a Ray cluster or starts a local instance locked down for one
server: loopback only, no dashboard web UI, no usage stats, token auth on. ``ray`` is
imported lazily.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass

from bitserve.config import ReplicaConfig
from bitserve.replica_set import ReplicaStartError

log = logging.getLogger(__name__)


@dataclass
class RaySession:
    """This process's connection to Ray; ``owned`` when this process called ``ray.init``."""

    owned: bool
    local: bool

    @staticmethod
    def is_local(address: str | None) -> bool:
        """Whether ``address`` means a new Ray instance on this machine: 'local', or nothing given
        and no ``$RAY_ADDRESS``."""
        return address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))

    @classmethod
    def connect(cls, address: str | None = None, **local_options) -> RaySession:
        """Reuse an initialized Ray, join ``address`` (or ``$RAY_ADDRESS``), or start a local instance
        (``local_options`` such as ``num_cpus`` go to ``ray.init`` then)."""
        imported = sys.modules.get("ray")
        if imported is not None and imported.is_initialized():
            return cls(owned=False, local=False)
        local = cls.is_local(address)
        if local:
            cls._prepare_local_env()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError:
            raise ReplicaStartError("engine replicas on Ray (--replicas > 1 or --ray-address) need the 'ray' "
                                    "package: pip install ray") from None
        try:
            if local:
                ray.init(address="local", include_dashboard=False, log_to_driver=True, **local_options)
            else:
                ray.init(address=address, log_to_driver=True)
        except Exception as e:  # unreachable address, missing auth token, ...
            where = "start a local Ray instance" if local else f"join the Ray cluster at {address or '$RAY_ADDRESS'}"
            raise ReplicaStartError(f"cannot {where}: {e}") from e
        return cls(owned=True, local=local)

    @staticmethod
    def _prepare_local_env() -> None:
        """Before Ray starts processes: bind them to loopback only (Ray's single-machine mode) and, unless
        configured otherwise, turn on token auth with a token for this instance only."""
        if "ray" not in sys.modules:  # read when ray is imported
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = "token"
            if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
                os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False


def replica_resources(cfg: ReplicaConfig, device: str, cluster_gpus: float, joining: bool) -> tuple[float, float]:
    """(CPUs, GPUs) each replica reserves; see ``ReplicaConfig.gpus_per_replica`` for the default."""
    gpus = cfg.gpus_per_replica
    if gpus is None:
        if device == "cpu":
            gpus = 0.0
        elif joining or device.startswith("cuda"):
            gpus = 1.0
        else:
            gpus = 1.0 if cluster_gpus >= 1 else 0.0
    if gpus == 0 and device.startswith("cuda"):
        raise ValueError(f"--device {device} needs GPUs: set --gpus-per-replica above 0")
    if gpus > 0 and device == "cpu":
        raise ValueError("--device cpu with --gpus-per-replica above 0 would reserve GPUs no replica uses")
    if gpus > 1:
        log.warning("each replica runs one engine on one GPU; the other %g reserved GPU(s) stay idle", gpus - 1)
    return cfg.cpus_per_replica, gpus
