"""A small client of the ChatService (used by ``bitserve chat`` and ``bitserve bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc

from bitserve.v1 import chat_pb2 as pb
from bitserve.v1 import chat_pb2_grpc


def channel_credentials(ca_cert: str | None):
    return grpc.ssl_channel_credentials(Path(ca_cert).read_bytes() if ca_cert else None)


def metadata(api_token: str | None) -> tuple:
    return (("authorization", f"Bearer {api_token}"),) if api_token else ()


def open_channel(address: str, *, tls: bool = False, ca_cert: str | None = None) -> grpc.Channel:
    if tls or ca_cert:
        return grpc.secure_channel(address, channel_credentials(ca_cert))
    return grpc.insecure_channel(address)


def sampling_options(**values) -> pb.SamplingOptions:
    """SamplingOptions from keyword arguments, leaving None values unset."""
    opts = pb.SamplingOptions()
    for name, value in values.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(opts, name).extend(value)
        elif name == "logit_bias":
            opts.logit_bias.update(value)
        else:
            setattr(opts, name, value)
    return opts


class ServerError(RuntimeError):
    """A call failed; ``code`` is the gRPC status name (e.g. "UNAVAILABLE")."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def _server_error(e: grpc.RpcError) -> ServerError:
    return ServerError(e.code().name, e.details() or "")


class ChatClient:
    """Blocking client; gRPC failures surface as :class:`ServerError`."""

    def __init__(self, address: str, *, tls: bool = False, ca_cert: str | None = None, api_token: str | None = None):
        self.channel = open_channel(address, tls=tls, ca_cert=ca_cert)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.metadata = metadata(api_token)

    def model_info(self, timeout: float = 10.0) -> pb.ModelInfo:
        try:
            return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=timeout,
                                          wait_for_ready=True)
        except grpc.RpcError as e:
            raise _server_error(e) from None

    def stream_chat(self, messages: list[dict], sampling: pb.SamplingOptions, timeout: float | None = None
                    ) -> Iterator[pb.StreamEvent]:
        request = pb.ChatRequest(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                                 sampling=sampling)
        try:
            yield from self.stub.ChatStream(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise _server_error(e) from None

    def close(self) -> None:
        self.channel.close()
