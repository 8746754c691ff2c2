"""Push mode: a camera-side stream of feature packets to the Rx over one long-lived Publish call.

    frames (folder, video, camera) ─► paced at --fps ─► encode ─► [pending: 1 slot] ─► window ─► Publish ─► Rx
                                                                   newest wins:           ≤ W frames sent,
                                                                   a frame not yet sent   not acknowledged
                                                                   is replaced (dropped)

When the uplink is slower than the frame rate the window fills, the pending frame is
replaced by each newer one, and every replaced frame is counted in `dropped`: nothing is
buffered without bound, and the Rx always gets the newest frame next. If the call fails
(the Rx restarted, the link broke), frames sent and not acknowledged are counted in `lost`,
and the streamer reconnects with exponential backoff and goes on with the newest frame.
A refusal that retrying cannot fix (another model: FAILED_PRECONDITION; a bad packet)
ends the stream with that error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from PIL import Image, ImageSequence
from prometheus_client import Counter

from shared.errors import BadRequestError, RemoteError
from shared.grpc_util import open_channel
from shared.protocol import pb, pb_grpc
from tx_service.engine import TxEngine

log = logging.getLogger("splitvlm.tx")

FRAMES = Counter("splitvlm_stream_frames_total", "Push-mode frames, by outcome", ["outcome"])

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm"}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def frames_from(source: Path) -> Iterator[Image.Image]:
    """A folder's images in name order, a video file's frames (PyAV), a V4L2 camera (/dev/videoN),
    or the frames of a multi-frame image file (GIF, APNG, TIFF)."""
    if str(source).startswith("/dev/video"):
        yield from _video_frames(str(source), "v4l2")
        return
    if source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
        yield from _video_frames(str(source), None)
        return
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BadRequestError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        for path in files:
            with Image.open(path) as img:
                yield img.convert("RGB")
        return
    if not source.is_file():
        raise BadRequestError(f"stream source {source} is neither a folder nor a file")
    with Image.open(source) as img:
        for frame in ImageSequence.Iterator(img):
            yield frame.convert("RGB")


def _video_frames(source: str, container_format: str | None) -> Iterator[Image.Image]:
    try:
        import av
    except ImportError:
        raise BadRequestError(f"reading {source} needs PyAV: pip install 'splitvlm[video]'") from None
    try:
        container = av.open(source, format=container_format)
    except (av.FFmpegError, OSError) as exc:
        raise BadRequestError(f"cannot open video source {source}: {exc}") from None
    with container:
        if not container.streams.video:
            raise BadRequestError(f"{source} has no video stream")
        try:
            for frame in container.decode(video=0):
                yield frame.to_image().convert("RGB")
        except av.FFmpegError as exc:
            raise BadRequestError(f"video source {source} failed to decode: {exc}") from None


@dataclass
class StreamStats:
    captured: int = 0
    sent: int = 0
    acked: int = 0
    dropped: int = 0  # replaced while waiting for the window (newest wins)
    lost: int = 0  # sent but not acknowledged when a connection failed
    reconnects: int = 0
    feature_ids: dict[int, str] = field(default_factory=dict)  # sequence -> feature id, acknowledged

    def line(self) -> str:
        return (
            f"captured {self.captured}, sent {self.sent}, acknowledged {self.acked}, "
            f"dropped {self.dropped} (newest wins), lost in reconnects {self.lost}, "
            f"reconnects {self.reconnects}"
        )


class FrameStreamer:
    """Streams frames to an Rx's Publish RPC; `run` returns when every frame is sent or dropped."""

    def __init__(
        self,
        engine: TxEngine,
        stream_id: str,
        *,
        rx_address: str | None = None,
        window: int | None = None,
        codec: str = "",
        fps: float | None = None,
        backoff_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self.engine = engine
        self.stream_id = stream_id
        self.rx_address = rx_address or engine.settings.rx_address
        self.window = window or engine.settings.stream_window
        self.codec = codec
        self.fps = fps
        self.backoff_s = backoff_s
        self.stats = StreamStats()
        self.error: RemoteError | None = None
        self._cond = threading.Condition()
        self._pending: pb.PublishRequest | None = None
        self._inflight: list[int] = []  # sequences sent, not yet acknowledged
        self._finished = False  # the source is exhausted
        self._stop = threading.Event()

    def run(self, frames: Iterable[Image.Image]) -> StreamStats:
        sender = threading.Thread(target=self._send_loop, name="tx-stream", daemon=True)
        sender.start()
        t0 = time.monotonic()
        try:
            for seq, image in enumerate(frames):
                if self.error is not None:
                    break
                if self.fps:
                    delay = t0 + seq / self.fps - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                captured = int(time.time() * 1000)
                encoded = self.engine.encode(image, self.codec)
                request = pb.PublishRequest(
                    frame=pb.FrameInfo(stream_id=self.stream_id, sequence=seq, capture_unix_ms=captured),
                    packet=pb.FeaturePacket(header=encoded.header, payload=encoded.payload),
                )
                with self._cond:
                    self.stats.captured += 1
                    if self._pending is not None:
                        self.stats.dropped += 1
                        FRAMES.labels("dropped").inc()
                    self._pending = request
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()
            sender.join()
        if self.error is not None:
            raise self.error
        return self.stats

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    # ---- sender thread --------------------------------------------------------------------
    def _done(self) -> bool:
        return self._stop.is_set() or (self._finished and self._pending is None and not self._inflight)

    def _send_loop(self) -> None:
        delay = self.backoff_s[0]
        while True:
            with self._cond:
                if self._done() or self.error is not None:
                    return
            alive = threading.Event()
            alive.set()
            channel = open_channel(self.rx_address)
            try:
                stub = pb_grpc.RxServiceStub(channel)
                for ack in stub.Publish(self._requests(alive)):
                    delay = self.backoff_s[0]  # a working connection resets the backoff
                    with self._cond:
                        if ack.sequence in self._inflight:
                            self._inflight.remove(ack.sequence)
                        self.stats.acked += 1
                        self.stats.feature_ids[ack.sequence] = ack.feature_id
                        self._cond.notify_all()
                    FRAMES.labels("acked").inc()
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                busy = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Publish streams" in (
                    exc.details() or ""
                )
                if code not in _RETRYABLE and not busy:
                    self.error = RemoteError(code, exc.details() or "", f"rx {self.rx_address}")
                    log.error("stream %s refused: %s", self.stream_id, self.error)
                    with self._cond:
                        self._cond.notify_all()
                    return
                log.warning(
                    "stream %s: Rx unavailable (%s); retrying in %.1fs", self.stream_id, code.name, delay
                )
            finally:
                alive.clear()
                channel.close()
            with self._cond:
                if self._inflight:
                    self.stats.lost += len(self._inflight)
                    FRAMES.labels("lost").inc(len(self._inflight))
                    self._inflight.clear()
                if self._done():
                    return
                self.stats.reconnects += 1
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff_s[1])

    def _requests(self, alive: threading.Event) -> Iterator[pb.PublishRequest]:
        while True:
            with self._cond:
                while alive.is_set() and not self._stop.is_set():
                    if self._pending is not None and len(self._inflight) < self.window:
                        break
                    if self._finished and self._pending is None:
                        return  # half-close; the Rx acknowledges what it got, then ends the call
                    self._cond.wait(timeout=0.5)
                if not alive.is_set() or self._stop.is_set() or self._pending is None:
                    return
                request, self._pending = self._pending, None
                self._inflight.append(request.frame.sequence)
                self.stats.sent += 1
            FRAMES.labels("sent").inc()
            yield request
