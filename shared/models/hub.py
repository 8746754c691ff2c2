"""Hugging Face hub checkpoints: download what a half needs, with progress bars, or say why not.

``fetch_checkpoint("org/name", prefixes)`` downloads into the Hugging Face cache (``HF_HOME``):
first the small files (config, processor and tokenizer files, ``model.safetensors.index.json``),
then, when ``prefixes`` is given (the Tx: vision tower, plus the connector when it is split after
the projector), only the weight shards that the index maps those tensors to; the others are
skipped and their size is reported. Without ``prefixes`` (the Rx) every shard is fetched.

The sha256 of each skipped shard (the hub's LFS object id, which is the sha256 of the file) is
kept beside the snapshot in ``.splitvlm-remote.json``, so the model fingerprint of a partial
download equals that of the whole checkpoint (`shared.models.registry.model_fingerprint`).

Downloading goes through a `Hub` (the real one: `HfHub`); tests pass a local fake.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.errors import ModelError

log = logging.getLogger("splitvlm.hub")

INDEX_FILE = "model.safetensors.index.json"
REMOTE_DIGESTS_FILE = ".splitvlm-remote.json"
# Small files a half may read: config, processor, tokenizer, chat template, generation config.
METADATA_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int = 0
    sha256: str = ""  # LFS object id (files stored in LFS: the weights)


class Hub(Protocol):
    def list_files(self, repo_id: str) -> tuple[str, list[RemoteFile]]:
        """The resolved revision (commit sha) and the repository's files."""
        ...

    def download(self, repo_id: str, filename: str, revision: str) -> Path:
        """Download one file into the local cache (progress bar); its local path."""
        ...


class HfHub:
    """The Hugging Face hub through `huggingface_hub` (honours HF_HOME, HF_ENDPOINT, HF_TOKEN)."""

    def list_files(self, repo_id: str) -> tuple[str, list[RemoteFile]]:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, files_metadata=True)
        files = []
        for sibling in info.siblings or []:
            lfs: Any = sibling.lfs
            sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", "")) or ""
            files.append(RemoteFile(sibling.rfilename, int(sibling.size or 0), str(sha)))
        return str(info.sha), files

    def download(self, repo_id: str, filename: str, revision: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, revision=revision))


@dataclass
class DownloadPlan:
    revision: str
    metadata: list[RemoteFile]
    weights: list[RemoteFile] = field(default_factory=list)
    skipped: list[RemoteFile] = field(default_factory=list)

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in [*self.metadata, *self.weights])

    @property
    def skipped_bytes(self) -> int:
        return sum(f.size for f in self.skipped)

    def summary(self, repo_id: str) -> str:
        text = (
            f"{repo_id}@{self.revision[:12]}: {len(self.metadata) + len(self.weights)} files, "
            f"{_mb(self.download_bytes)}"
        )
        if self.skipped:
            text += (
                f"; skipped {len(self.skipped)} weight shards ({_mb(self.skipped_bytes)}) that this half "
                "does not need"
            )
        return text


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, true, yes, on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _is_metadata(name: str) -> bool:
    return "/" not in name and name.endswith(METADATA_SUFFIXES)


def shards_for(weight_map: dict[str, str], prefixes: Sequence[str]) -> set[str]:
    """The shard files holding any tensor under ``prefixes``."""
    return {str(f) for key, f in weight_map.items() if key.startswith(tuple(prefixes))}


def fetch_checkpoint(
    repo_id: str,
    prefixes_for: Any = None,
    hub: Hub | None = None,
) -> tuple[Path, DownloadPlan]:
    """Download ``repo_id``'s checkpoint (or the part a half needs); (snapshot folder, plan).

    ``prefixes_for(config: dict) -> tuple[str, ...] | None`` names the tensor prefixes to keep
    (None or no callable: every shard).
    """
    hub = hub or HfHub()
    revision, files = hub.list_files(repo_id)
    by_name = {f.name: f for f in files}
    if "config.json" not in by_name:
        raise ModelError(f"hub repository {repo_id} has no config.json: not a transformers checkpoint")
    plan = DownloadPlan(revision, metadata=[f for f in files if _is_metadata(f.name)])
    local: dict[str, Path] = {}
    for f in plan.metadata:
        local[f.name] = hub.download(repo_id, f.name, revision)
    snapshot = local["config.json"].parent
    config = json.loads(local["config.json"].read_text())
    prefixes = prefixes_for(config) if prefixes_for is not None else None

    root_weights = [f for f in files if "/" not in f.name and f.name.endswith(".safetensors")]
    if not root_weights:
        raise ModelError(
            f"hub repository {repo_id} has no *.safetensors weights (only safetensors checkpoints can be "
            "split; convert .bin checkpoints with save_pretrained)"
        )
    if INDEX_FILE in local and prefixes:
        weight_map = json.loads(local[INDEX_FILE].read_text())["weight_map"]
        needed = shards_for(weight_map, prefixes)
        if not needed:
            raise ModelError(
                f"{repo_id}'s {INDEX_FILE} maps no tensor under {' or '.join(prefixes)}: "
                "is this a vision-language checkpoint?"
            )
        listed = set(weight_map.values())
        plan.weights = [f for f in root_weights if f.name in needed]
        plan.skipped = [f for f in root_weights if f.name in listed and f.name not in needed]
    else:
        plan.weights = root_weights
    log.warning("downloading %s", plan.summary(repo_id))
    for f in plan.weights:
        hub.download(repo_id, f.name, revision)
    if plan.skipped:
        _record_remote_digests(snapshot, plan.skipped)
    return snapshot, plan


def _record_remote_digests(snapshot: Path, files: list[RemoteFile]) -> None:
    path = snapshot / REMOTE_DIGESTS_FILE
    known = remote_digests(snapshot)
    known.update({f.name: f.sha256 for f in files if f.sha256})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": known}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def remote_digests(folder: Path) -> dict[str, str]:
    """sha256 by file name of the shards a partial download skipped (empty when none)."""
    try:
        data = json.loads((Path(folder) / REMOTE_DIGESTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    sha = data.get("sha256") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in sha.items()} if isinstance(sha, dict) else {}


def offline_error(repo_id: str, cause: str = "") -> ModelError:
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return ModelError(
        f"model {repo_id!r} is not in the Hugging Face cache (HF_HOME={home}) and downloads are off "
        f"(HF_HUB_OFFLINE=1){' [' + cause + ']' if cause else ''}: unset HF_HUB_OFFLINE (or set it to 0) "
        f"to download it, or fetch it where the hub is reachable with `hf download {repo_id}` and copy "
        "that HF_HOME here, or pass a local checkpoint folder"
    )
