"""Client SDK for the Tx service.

>>> from tx_service.client import TxClient
>>> with TxClient("127.0.0.1:50051") as tx:
...     answer = tx.ask("photo.png", "What color is the circle?")
...     print(answer.text, answer.payload_bytes)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from rx_service.client import options_to_pb
from shared.answer import Answer
from shared.grpc_util import as_remote_error, open_channel, relay_errors
from shared.images import ImageInput, image_to_bytes
from shared.protocol import pb, pb_grpc
from shared.security import bearer_metadata
from shared.split import GenerationOptions


class TxClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout_s: float = 300.0,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        """`credentials`: TLS (`shared.security.channel_credentials(ca)`); `token`: bearer token."""
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(address, credentials)
        self._stub = pb_grpc.TxServiceStub(self._channel)

    def ask_stream(
        self,
        image: ImageInput,
        prompt: str,
        *,
        codec: str = "",
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        request_id: str = "",
        target_bytes: int = 0,
        target_fidelity: float = 0.0,
    ) -> Iterator[pb.TextChunk]:
        """Stream the answer; the last chunk has `done` set and carries bytes and timings.

        `target_bytes` / `target_fidelity` (instead of `codec`) ask the Tx to pick the codec by
        rate control: a payload of at most that many bytes, or the smallest payload keeping that
        mean per-token cosine; the last chunk's `codec_spec` and `rate_control` report the choice.
        """
        request = pb.AskRequest(
            image=image_to_bytes(image),
            prompt=prompt,
            codec=codec,
            request_id=request_id,
            target_bytes=target_bytes,
            target_fidelity=target_fidelity,
            options=options_to_pb(GenerationOptions(max_new_tokens, temperature, top_p, top_k, seed)),
        )
        stream = self._stub.Ask(request, timeout=self.timeout_s, metadata=self._metadata)
        return relay_errors(stream, f"tx {self.address}")

    def ask(self, image: ImageInput, prompt: str, **kwargs: Any) -> Answer:
        """Ask one question about one image and wait for the whole answer."""
        return Answer.from_chunks(self.ask_stream(image, prompt, **kwargs))

    def info(self) -> pb.InfoResponse:
        try:
            return self._stub.Info(pb.InfoRequest(), timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise as_remote_error(exc, f"tx {self.address}") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
