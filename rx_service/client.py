"""Client SDK for the Rx service (gRPC, and HTTP for packet uploads)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx

from shared.answer import Answer
from shared.errors import RemoteError
from shared.grpc_util import as_remote_error, open_channel, relay_errors
from shared.protocol import pb, pb_grpc
from shared.security import bearer_metadata
from shared.split import GenerationOptions


def options_to_pb(options: GenerationOptions | None) -> pb.GenerationOptions:
    if options is None:
        return pb.GenerationOptions()
    return pb.GenerationOptions(
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        seed=options.seed,
    )


class RxClient:
    """gRPC client: stream a packet (header + payload) and a prompt, get text back.

    >>> with RxClient("127.0.0.1:50061") as rx:
    ...     answer = rx.generate(header, payload, "What is in the image?")
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = 300.0,
        chunk_bytes: int = 256 * 1024,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        """`credentials`: TLS (`shared.security.channel_credentials`); `token`: bearer token."""
        self.address = address
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(address, credentials)
        self._stub = pb_grpc.RxServiceStub(self._channel)

    def info(self, timeout_s: float | None = None) -> pb.InfoResponse:
        try:
            return self._stub.Info(
                pb.InfoRequest(), timeout=timeout_s or self.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise as_remote_error(exc, f"rx {self.address}") from None

    def generate_stream(
        self,
        header: pb.FeatureHeader,
        payload: bytes,
        prompt: str,
        options: GenerationOptions | None = None,
    ) -> Iterator[pb.TextChunk]:
        return self.stream_requests(self.build_requests(header, payload, prompt, options))

    def stream_requests(self, requests: list[pb.GenerateRequest]) -> Iterator[pb.TextChunk]:
        """Send prepared requests (see `build_requests`); lets a caller count wire bytes first."""
        stream = self._stub.Generate(iter(requests), timeout=self.timeout_s, metadata=self._metadata)
        return relay_errors(stream, f"rx {self.address}")

    def generate(
        self,
        header: pb.FeatureHeader,
        payload: bytes,
        prompt: str,
        options: GenerationOptions | None = None,
    ) -> Answer:
        return Answer.from_chunks(self.generate_stream(header, payload, prompt, options))

    def build_requests(
        self, header: pb.FeatureHeader, payload: bytes, prompt: str, options: GenerationOptions | None
    ) -> list[pb.GenerateRequest]:
        """The message sequence of one Generate call: `start`, then payload chunks."""
        start = pb.GenerateStart(header=header, prompt=prompt, options=options_to_pb(options))
        requests = [pb.GenerateRequest(start=start)]
        view = memoryview(payload)
        for offset in range(0, len(payload), self.chunk_bytes):
            requests.append(pb.GenerateRequest(payload_chunk=bytes(view[offset : offset + self.chunk_bytes])))
        return requests

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RxHttpClient:
    """HTTP client for the Rx FastAPI app: upload a serialized FeaturePacket."""

    def __init__(
        self, base_url: str, timeout_s: float = 300.0, *, verify: str | bool = True, token: str | None = None
    ) -> None:
        """`verify`: CA file for an https:// Rx (or True: system roots); `token`: bearer token."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, verify=verify, headers=headers)

    def info(self) -> dict[str, Any]:
        return self._check(self._http.get("/v1/info")).json()

    def generate(self, packet: bytes, prompt: str, **options: Any) -> dict[str, Any]:
        data = {"prompt": prompt, **{k: str(v) for k, v in options.items()}}
        resp = self._http.post("/v1/generate", files={"packet": ("packet.bin", packet)}, data=data)
        return self._check(resp).json()

    @staticmethod
    def _check(resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise RemoteError(grpc.StatusCode.UNKNOWN, f"HTTP {resp.status_code}: {detail}", "rx-http")
        return resp

    def close(self) -> None:
        self._http.close()
