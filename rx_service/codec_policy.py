"""Which codecs an Rx accepts: `RxSettings.codecs`, enforced on every packet before its payload.

Entries are presets or specs (``int8``, ``pool:2|int8|zstd``), plus two words:

    ladder   every spec of the Tx's rate-control ladder (`shared.codecs.rate.DEFAULT_LADDER`)
    any      any calibration-free codec a packet names (built on first use, a bounded number kept)

Calibrated codecs are accepted exactly when the Rx holds their artifact (`codec_artifacts`, or
found by `shared.codecs.artifacts`); a calibrated entry without one (e.g. the `balanced` preset
on a model nobody calibrated) is left out with a warning, and a packet naming it is refused
with the command that makes the artifact.
A packet whose codec is not accepted is refused with FAILED_PRECONDITION (HTTP 409), naming
the accepted ones, before any payload byte is read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from shared.codecs import Codec, build_codec
from shared.codecs.artifacts import ArtifactIndex
from shared.codecs.calibrate import build_codec_with, parse_stages
from shared.codecs.calibration import CalibrationArtifact, needs_calibration
from shared.codecs.rate import DEFAULT_LADDER
from shared.errors import CodecError, FingerprintMismatchError

log = logging.getLogger("splitvlm.rx")

ANY = "any"
LADDER = "ladder"
MAX_SPEC_CHARS = 256  # longer codec specs are refused unread (and never echoed back)
_MAX_EXTRA_CODECS = 64  # codecs built on demand under `any`, kept for reuse


def clip(text: str, limit: int = 80) -> str:
    """`text` for an error message: a client's string is never echoed back at length."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class CodecPolicy:
    """The accepted codecs by fingerprint, and whether any calibration-free spec is accepted."""

    def __init__(
        self,
        entries: list[str],
        artifacts: ArtifactIndex | Mapping[str, CalibrationArtifact],
        supported: Callable[[Codec], None] | None = None,
    ) -> None:
        self.allow_any = ANY in entries
        self.artifacts = artifacts
        self.codecs: dict[str, Codec] = {}
        self._fixed = 0
        self._lock = threading.Lock()
        for entry in entries:
            if entry == ANY:
                continue
            if entry == LADDER:
                for spec in DEFAULT_LADDER:
                    codec = build_codec(spec)
                    try:
                        if supported is not None:
                            supported(codec)  # e.g. token reducers on a split without reduction
                    except CodecError:
                        continue
                    self.codecs[codec.fingerprint] = codec
                continue
            try:
                codec = build_codec_with(entry, artifacts)
            except CodecError as exc:
                if not any(map(needs_calibration, parse_stages(entry)[1])):
                    raise
                log.warning("codec %r is not accepted: %s", entry, exc)
                continue
            self.codecs[codec.fingerprint] = codec
        for spec, artifact in artifacts.items():
            codec = build_codec(spec, artifact=artifact)
            self.codecs[codec.fingerprint] = codec
        self._fixed = len(self.codecs)

    def describe(self, most: int = 6) -> str:
        names = sorted({c.spec for c in list(self.codecs.values())[: self._fixed]})
        shown = ", ".join(names[:most])
        if len(names) > most:
            shown += f" and {len(names) - most} more (see Info)"
        return shown + (" and any calibration-free codec" if self.allow_any else "")

    def codec_for(self, spec: str, fingerprint: str) -> Codec:
        """The accepted codec a packet names, or a precise refusal."""
        if len(spec) > MAX_SPEC_CHARS:
            raise CodecError(f"codec spec of {len(spec)} characters; at most {MAX_SPEC_CHARS}")
        codec = self.codecs.get(fingerprint)
        if codec is not None:
            return codec
        try:
            codec = build_codec_with(spec, self.artifacts)
        except CodecError as exc:
            raise CodecError(f"packet codec spec {clip(spec)!r} is not usable here: {exc}") from None
        if codec.fingerprint != fingerprint:
            raise FingerprintMismatchError(
                f"codec fingerprint mismatch for {clip(spec)!r}: the packet has "
                f"{clip(fingerprint) or '<none>'}, this Rx computes {codec.fingerprint} "
                "(calibrated codecs need the same artifact on both sides)"
            )
        if not self.allow_any:
            raise FingerprintMismatchError(
                f"codec {codec.spec!r} is not accepted by this Rx; it accepts {self.describe()} "
                "(SPLITVLM_RX_CODECS; 'any' accepts every calibration-free codec)"
            )
        with self._lock:
            if len(self.codecs) < self._fixed + _MAX_EXTRA_CODECS:
                self.codecs[codec.fingerprint] = codec
        return codec
