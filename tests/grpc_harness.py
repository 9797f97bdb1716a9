"""Run an in-process bitserve gRPC server on a loopback port in a background thread."""

from __future__ import annotations

import asyncio
import threading

import grpc

from bitserve.app import build_app
from bitserve.config import EngineConfig, ModelLoadConfig, ServerConfig
from bitserve.rpc.server import RpcServer
from bitserve.v1 import chat_pb2 as pb
from bitserve.v1 import chat_pb2_grpc


class ServerThread:
    def __init__(self, model_path, *, engine: dict | None = None, server: dict | None = None, metrics: bool = False,
                 start: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = None
        holder = []
        self.app = build_app(ModelLoadConfig(model=str(model_path), dtype="float32", device="cpu"),
                             EngineConfig(**{"block_size": 4, **(engine or {})}),
                             on_finish=lambda final: holder[0].observe_finished(final) if holder else None)
        if metrics:
            from bitserve.metrics import Metrics

            self.metrics = Metrics(self.app.info, self.app.replica.stats)
            holder.append(self.metrics)
        config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": -1, "grace_period_s": 10.0,
                                 **(server or {})})
        self.rpc = self.run(self._make(config))
        self.port = None
        if start:
            self.start()

    async def _make(self, config):
        return RpcServer(self.app, config, self.metrics)  # grpc.aio objects belong to this loop

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self) -> int:
        self.port = self.run(self.rpc.start())
        return self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> chat_pb2_grpc.ChatServiceStub:
        return chat_pb2_grpc.ChatServiceStub(self.channel())

    def close(self) -> None:
        if not self.rpc.draining:
            try:
                self.run(self.rpc.drain(grace=2.0))
            except Exception:  # noqa: BLE001 - best effort in teardown
                pass
        self.app.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def chat_request(text: str, **sampling) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=text)],
                          sampling=pb.SamplingOptions(**sampling))
