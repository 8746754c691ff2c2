"""Push mode over real loopback servers: a 100-frame camera stream through a throttled uplink
(newest frame wins, drops counted), questions while it streams, and an Rx restart with the
Redis store (earlier frames still answer; the Tx reconnects and resumes the stream).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from redis_server import free_port, redis_server
from typer.testing import CliRunner

from rx_service.prefix_cache import PrefixKVCache
from rx_service.server import start_rx
from rx_service.store.redis import RedisFeatureStore
from shared.bench.latency import ThrottledProxy
from shared.cli import app as cli_app
from shared.errors import RemoteError
from shared.grpc_util import open_channel, relay_errors
from shared.protocol import pb, pb_grpc
from tx_service.streamer import FrameStreamer, frames_from


def _frame(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    arr[: 8 + i % 40, :, i % 3] = 255  # each frame differs (distinct feature ids)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def frame_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("camera")
    for i in range(100):
        _frame(i).save(folder / f"frame_{i:04d}.png")
    return folder


def _ask_latest(rx: Any, stream_id: str) -> openai.types.chat.ChatCompletion:
    with openai.OpenAI(base_url=rx.http_url + "/v1", api_key="unused", max_retries=0) as client:
        return client.chat.completions.create(
            model=rx.engine.model_id,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"splitvlm://streams/{stream_id}/latest"}},
                        {"type": "text", "text": "What changed?"},
                    ],
                }
            ],
            max_tokens=3,
        )


def test_100_frames_through_a_throttled_link_newest_wins(rx: Any, tx: Any, frame_dir: Path) -> None:
    answers: list[str] = []
    not_yet = 0
    streaming = threading.Event()
    streaming.set()

    def ask_while_streaming() -> None:
        nonlocal not_yet
        while streaming.is_set():
            try:
                resp = _ask_latest(rx, "cam-throttled")
                answers.append((resp.model_extra or {})["splitvlm"]["feature_id"])
            except openai.NotFoundError:
                not_yet += 1  # before the first frame arrives
            time.sleep(0.2)

    asker = threading.Thread(target=ask_while_streaming)
    # ~4.4 kB int8 packets through 0.02 Mbit/s: ~1.8 s each, while the camera makes one every 0.04 s
    # (and encoding takes < 0.5 s per frame even on a loaded 2-core machine): most frames must drop.
    with ThrottledProxy(rx.grpc_address, mbps=0.02, rtt_ms=20) as link:
        streamer = FrameStreamer(
            tx.engine, "cam-throttled", rx_address=link.address, window=2, fps=25, codec="int8"
        )
        asker.start()
        try:
            stats = streamer.run(frames_from(frame_dir))
        finally:
            streaming.clear()
            asker.join()
    print(f"\n100-frame stream at 25 fps through 0.02 Mbit/s, window 2: {stats.line()}")
    assert stats.captured == 100
    assert stats.dropped > 0, stats.line()  # the uplink cannot carry 25 fps
    assert stats.sent + stats.dropped == 100 and stats.acked == stats.sent and stats.lost == 0
    assert 99 in stats.feature_ids  # newest wins: the last frame is always delivered
    assert answers, f"no question answered while streaming ({not_yet} asked before the first frame)"
    assert set(answers) <= set(stats.feature_ids.values())
    listing = {
        s["stream_id"]: s for s in httpx.get(f"{rx.http_url}/v1/streams", timeout=30).json()["streams"]
    }
    info = listing["cam-throttled"]
    assert info["latest_sequence"] == 99 and info["frames_received"] == stats.acked
    assert info["latest_feature_id"] == stats.feature_ids[99]
    assert _ask_latest(rx, "cam-throttled").model_extra["splitvlm"]["feature_id"] == stats.feature_ids[99]  # type: ignore[index]


def test_publish_for_another_model_is_failed_precondition(rx: Any, tx: Any) -> None:
    encoded = tx.engine.encode(_frame(0), "int8")
    encoded.header.model_fingerprint = "sha256:" + "0" * 64
    request = pb.PublishRequest(
        frame=pb.FrameInfo(stream_id="wrong", sequence=0, capture_unix_ms=1),
        packet=pb.FeaturePacket(header=encoded.header, payload=encoded.payload),
    )
    channel = open_channel(rx.grpc_address)
    try:
        stub = pb_grpc.RxServiceStub(channel)
        with pytest.raises(RemoteError) as info:
            list(relay_errors(stub.Publish(iter([request]), timeout=30), "rx"))
    finally:
        channel.close()
    assert info.value.grpc_code == grpc.StatusCode.FAILED_PRECONDITION
    # The streamer ends with the refusal instead of retrying forever.
    tampered = dataclasses.replace(tx.engine, fingerprint="sha256:" + "0" * 64)
    with pytest.raises(RemoteError) as info2:
        FrameStreamer(tampered, "wrong", rx_address=rx.grpc_address).run(iter([_frame(1)]))
    assert info2.value.grpc_code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


def _start_rx_with_redis(rx: Any, redis_url: str, grpc_port: int) -> Any:
    """A fresh Rx process-equivalent: new servers, a new Redis client, the already-loaded model."""
    settings = rx.engine.settings.model_copy(
        update={"grpc_port": grpc_port, "http_port": 0, "store": "redis", "store_redis_url": redis_url}
    )
    engine = dataclasses.replace(
        rx.engine,
        settings=settings,
        store=RedisFeatureStore(redis_url, settings.store_ttl_s, settings.store_frames_per_stream),
        kv_cache=PrefixKVCache(settings.kv_cache_bytes, rx.engine.fingerprint),
    )
    return start_rx(settings, engine=engine)


def test_rx_restart_with_redis_keeps_frames_and_the_tx_resumes(rx: Any, tx: Any, redis_url: str) -> None:
    port = free_port()
    first = _start_rx_with_redis(rx, redis_url, port)
    acked_before_kill = threading.Event()
    restarted = threading.Event()

    def frames() -> Iterator[Image.Image]:
        for i in range(40):
            if i == 20:
                acked_before_kill.set()
                restarted.wait(timeout=60)  # the camera keeps its schedule; here it waits for the restart
            yield _frame(i)

    streamer = FrameStreamer(
        tx.engine, "cam-restart", rx_address=f"127.0.0.1:{port}", window=2, fps=50, backoff_s=(0.05, 0.5)
    )
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(stats=streamer.run(frames())))
    runner.start()
    assert acked_before_kill.wait(timeout=60)
    deadline = time.monotonic() + 30
    while not streamer.stats.feature_ids and time.monotonic() < deadline:
        time.sleep(0.02)
    early_seq, early_id = min(streamer.stats.feature_ids.items())
    first.stop()  # the Rx dies; its memory is gone, Redis keeps the frames
    first.engine.store.close()
    time.sleep(0.3)
    second = _start_rx_with_redis(rx, redis_url, port)
    restarted.set()
    runner.join(timeout=120)
    stats = result["stats"]
    try:
        print(f"\nstream across an Rx restart: {stats.line()}")
        assert stats.reconnects >= 1
        assert max(stats.feature_ids) == 39  # resumed: frames after the restart were acknowledged
        # The restarted Rx answers about a frame stored before it died.
        channel = open_channel(second.grpc_address)
        try:
            stub = pb_grpc.RxServiceStub(channel)
            request = pb.QueryRequest(
                feature_id=early_id, prompt="What is it?", options=pb.GenerationOptions(max_new_tokens=3)
            )
            chunks = list(relay_errors(stub.Query(request, timeout=60), "rx"))
        finally:
            channel.close()
        assert chunks[-1].done and chunks[-1].feature_id == early_id and any(c.token_ids for c in chunks)
        streams = {s.stream_id: s for s in second.engine.store.streams()}
        assert streams["cam-restart"].latest_sequence == 39 and early_seq < 20
    finally:
        second.stop()
        second.engine.store.close()


def test_tx_stream_cli_reports_counts(rx: Any, frame_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "few"
    small.mkdir()
    for i in range(5):
        _frame(i).save(small / f"{i}.png")
    result = CliRunner().invoke(
        cli_app, ["tx", "stream", "--source", str(small), "--stream-id", "cam-cli", "--rx", rx.grpc_address]
    )
    assert result.exit_code == 0, result.output
    assert "captured 5" in result.output and "acknowledged" in result.output
    latest = rx.engine.store.latest("cam-cli")
    assert latest is not None and latest.frame.sequence == 4


def test_publish_streams_are_bounded_and_generate_keeps_serving(rx: Any, tx: Any) -> None:
    """Each Publish stream holds a gRPC worker: past max_publish_streams they are refused, so
    idle publishers cannot take every worker from Generate."""
    from rx_service.client import RxClient
    from shared.split import GenerationOptions

    release = threading.Event()

    def idle() -> Iterator[pb.PublishRequest]:
        release.wait(timeout=60)
        return
        yield  # a generator that sends nothing until released

    channel = open_channel(rx.grpc_address)
    stub = pb_grpc.RxServiceStub(channel)
    limit = rx.engine.settings.max_publish_streams
    calls = [stub.Publish(idle(), timeout=60) for _ in range(limit)]
    try:
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Publish(idle(), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Publish streams" in (info.value.details() or "")
        encoded = tx.engine.encode(_frame(3), "int8")
        with RxClient(rx.grpc_address) as client:
            answer = client.generate(
                encoded.header, encoded.payload, "hi", GenerationOptions(max_new_tokens=2)
            )
        assert answer.token_ids
    finally:
        release.set()
        for call in calls:
            list(call)
        channel.close()


def test_video_file_source(rx: Any, tx: Any, tmp_path: Path) -> None:
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_image(_frame(i).resize((64, 48)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames = list(frames_from(clip))
    assert len(frames) == 12 and frames[0].size == (64, 48)
    stats = FrameStreamer(tx.engine, "cam-video", rx_address=rx.grpc_address).run(iter(frames))
    assert stats.captured == 12 and stats.acked + stats.dropped == 12 and 11 in stats.feature_ids
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    from shared.errors import BadRequestError

    with pytest.raises(BadRequestError, match="cannot open video source"):
        list(frames_from(broken))
