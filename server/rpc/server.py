"""The gRPC server's lifecycle: start, health, reflection, warm-up, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bitserve.app import App
from bitserve.config import ServerConfig
from bitserve.rpc.interceptor import ServerInterceptor
from bitserve.rpc.servicer import ChatServicer
from bitserve.sampling_params import SamplingParams
from bitserve.v1 import chat_pb2, chat_pb2_grpc

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
ABORT_FLUSH_S = 2.0  # after the grace period: how long aborted calls get to send their last (ABORT) responses
ENGINE_DOWN_LIVENESS_S = 60.0  # no engine ready for this long: the overall health (liveness) fails too
# gRPC's own cap on calls in flight is this far above --max-concurrent-streams (which the interceptor
# applies to the API alone): health probes and reflection still get through a full server
OPEN_CALLS_HEADROOM = 64


class RpcServer:
    """A grpc.aio server in front of an App. Health turns SERVING only after warm-up."""

    def __init__(self, app: App, config: ServerConfig, metrics=None):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.draining = False
        self.port: int | None = None
        self._watchdog: asyncio.Task | None = None
        self.health = health.aio.HealthServicer()
        token = config.api_token or os.environ.get("BITSERVE_API_TOKEN") or None
        interceptor = ServerInterceptor(
            is_draining=lambda: self.draining,
            api_token=token,
            observe=metrics.observe_rpc if metrics is not None else None,
            observe_started=metrics.observe_rpc_started if metrics is not None else None,
            max_calls=config.max_concurrent_streams,
        )
        mb = config.max_message_mb << 20
        self.server = grpc.aio.server(
            interceptors=[interceptor],
            maximum_concurrent_rpcs=config.max_concurrent_streams + OPEN_CALLS_HEADROOM,
            options=[
                ("grpc.max_send_message_length", mb),
                ("grpc.max_receive_message_length", mb),
                ("grpc.keepalive_time_ms", config.keepalive_time_s * 1000),
                ("grpc.keepalive_timeout_ms", config.keepalive_timeout_s * 1000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 0),
            ],
        )
        chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(app.frontend, config.default_max_tokens),
                                                        self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (CHAT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(CHAT_SERVICE, status)

    async def start(self) -> int:
        """Bind, start, warm up, then report SERVING. Returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls_cert:
                creds = grpc.ssl_server_credentials(
                    [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:  # grpcio raises instead of returning 0 (port in use, bad address, bad TLS files)
            why = ("in use, not an address of this machine, or --tls-cert/--tls-key are not a valid, matching PEM "
                   "certificate chain and key" if self.config.tls_cert else "in use, or not an address of this machine")
            raise OSError(f"cannot listen on {address} ({why}): {e}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        await self.warm_up()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.create_task(self._watch_engines())
        return self.port

    async def _watch_engines(self, period_s: float = 1.0, liveness_after_s: float = ENGINE_DOWN_LIVENESS_S) -> None:
        """Health follows the engines. The chat service (readiness) is NOT_SERVING while none is
        ready (an engine thread died, every Ray replica is down) and SERVING again when one is; the
        whole server (liveness) turns NOT_SERVING too once none has been ready for
        ``liveness_after_s`` (Ray restarts replicas faster than that; a dead in-process engine
        never comes back, and a restarted pod does)."""
        loop = asyncio.get_running_loop()
        ready_before, down_since, live = True, 0.0, True
        while not self.draining:
            ready = self.app.replica.num_ready > 0
            if ready != ready_before:
                ready_before = ready
                down_since = loop.time()
                if ready:
                    log.warning("an engine is ready again: health SERVING")
                else:
                    log.error("no engine is ready: health NOT_SERVING for %s", CHAT_SERVICE)
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set(CHAT_SERVICE, status)
                if ready and not live:
                    await self.health.set("", status)
                    live = True
            if not ready and live and loop.time() - down_since >= liveness_after_s:
                log.error("no engine has been ready for %.0f s: the server reports NOT_SERVING", liveness_after_s)
                await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                live = False
            await asyncio.sleep(period_s)

    async def warm_up(self) -> None:
        """One tiny generation through the whole path, so the first client does not pay for it."""
        frontend = self.app.frontend
        prompt = frontend.text_prompt("warm up") or [0]
        async for _ in frontend.generate("warmup-" + frontend.new_request_id(), prompt,
                                         SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                                         observed=False):
            pass

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting generation calls (UNAVAILABLE, health NOT_SERVING), let in-flight
        requests finish within the grace period, then abort the rest -- each of their choices
        ends with FINISH_REASON_ABORT and the text so far, streams and unary calls alike -- and
        give the calls up to :data:`ABORT_FLUSH_S` to send that before the server stops."""
        grace = self.config.grace_period_s if grace is None else grace
        self.draining = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.app.frontend.num_active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        aborted = self.app.frontend.abort_all()
        if aborted:
            log.warning("grace period (%.0f s) over: aborted %d request(s) still in flight", grace, aborted)
            flush_deadline = loop.time() + ABORT_FLUSH_S
            while self.app.frontend.num_active and loop.time() < flush_deadline:
                await asyncio.sleep(0.02)
        await self.server.stop(1.0)
        self.app.shutdown()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def run_until_signalled(rpc: RpcServer, on_ready=None) -> None:
    """Start the server and drain it on SIGTERM / SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await rpc.start()
    if on_ready is not None:
        on_ready(port)
    await stop.wait()
    log.info("draining (grace %.0fs)", rpc.config.grace_period_s)
    await rpc.drain()
