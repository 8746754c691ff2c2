"""Hub checkpoints without a network: the Tx downloads only the shards it needs; weights are
checked before any model code runs; offline, the error says how to get the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from shared.errors import ModelError
from shared.models import registry
from shared.models.hub import INDEX_FILE, RemoteFile, fetch_checkpoint, offline_error, remote_digests
from shared.split import ADAPTERS, SplitPoint, tx_weight_prefixes

REPO_ID = "acme/tiny-llava-sharded"


def _shard(folder: Path) -> dict[str, str]:
    """Rewrite the single-file tiny LLaVA as 3 shards with an index, as the hub stores big models:
    the vision tower, the projector with the first half of the language model, the rest."""
    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    lm = sorted(k for k in tensors if "vision_tower" not in k and "multi_modal_projector" not in k)
    groups = {
        "model-00001-of-00003.safetensors": [k for k in tensors if "vision_tower" in k],
        "model-00002-of-00003.safetensors": [k for k in tensors if "multi_modal_projector" in k]
        + lm[: len(lm) // 2],
        "model-00003-of-00003.safetensors": lm[len(lm) // 2 :],
    }
    weight_map = {}
    for name, keys in groups.items():
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    single.unlink()
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.fixture(scope="module")
def sharded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "tiny-llava-sharded"
    shutil.copytree(model_dir, folder)
    _shard(folder)
    return folder


class FakeHub:
    """A hub repository served from a local folder; records what was downloaded."""

    def __init__(self, source: Path, snapshots: Path) -> None:
        self.source, self.snapshot = source, snapshots / "snapshots" / "abc123"
        self.downloaded: list[str] = []

    def list_files(self, repo_id: str) -> tuple[str, list[RemoteFile]]:
        assert repo_id == REPO_ID
        files = []
        for p in sorted(self.source.iterdir()):
            sha = registry._sha256_file(p) if p.suffix == ".safetensors" else ""
            files.append(RemoteFile(p.name, p.stat().st_size, sha))
        return "abc123" * 6, files

    def download(self, repo_id: str, filename: str, revision: str) -> Path:
        self.downloaded.append(filename)
        self.snapshot.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.source / filename, self.snapshot / filename))


@pytest.mark.parametrize(
    "split, shards",
    [
        (SplitPoint.AFTER_VISION_TOWER, {"model-00001-of-00003.safetensors"}),
        (
            SplitPoint.AFTER_PROJECTOR,
            {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"},
        ),
    ],
)
def test_tx_downloads_only_the_shards_holding_its_tensors(
    sharded: Path, tmp_path: Path, cache_dir: Path, split: SplitPoint, shards: set[str]
) -> None:
    from shared.split import load_tx_half

    hub = FakeHub(sharded, tmp_path)
    snapshot, plan = fetch_checkpoint(REPO_ID, lambda config: tx_weight_prefixes(config, split), hub)
    weights = {f for f in hub.downloaded if f.endswith(".safetensors")}
    assert weights == shards
    assert {"config.json", INDEX_FILE} <= set(hub.downloaded)
    all_shards = {p.name for p in sharded.glob("*.safetensors")}
    assert {f.name for f in plan.skipped} == all_shards - shards
    assert plan.skipped_bytes == sum((sharded / n).stat().st_size for n in all_shards - shards) > 0
    assert f"skipped {len(all_shards - shards)} weight shards" in plan.summary(REPO_ID)
    # The partial snapshot is a working Tx checkpoint with the whole checkpoint's fingerprint.
    assert set(remote_digests(snapshot)) == all_shards - shards
    assert registry.model_fingerprint(snapshot, cache_dir) == registry.model_fingerprint(sharded, cache_dir)
    registry.check_weights(
        snapshot, tx_weight_prefixes(json.loads((snapshot / "config.json").read_text()), split)
    )
    half = load_tx_half(snapshot, split)
    assert half.num_parameters() > 0
    with pytest.raises(ModelError, match="lacks weight shards"):
        registry.check_weights(snapshot)  # ...but not an Rx checkpoint


def test_rx_downloads_every_shard(sharded: Path, tmp_path: Path) -> None:
    hub = FakeHub(sharded, tmp_path)
    _, plan = fetch_checkpoint(REPO_ID, None, hub)
    assert not plan.skipped
    assert {f for f in hub.downloaded if f.endswith(".safetensors")} == {
        p.name for p in sharded.glob("*.safetensors")
    }


def test_adapter_prefixes_match_what_the_adapters_load() -> None:
    from shared.split import idefics3, llava, qwen2_vl, qwen3_vl

    assert ADAPTERS["llava"].vision_prefixes == llava.VISION_TOWER_PREFIXES
    assert ADAPTERS["llava"].connector_prefixes == llava.PROJECTOR_PREFIXES
    assert ADAPTERS["idefics3"].vision_prefixes == idefics3.VISION_PREFIXES
    assert ADAPTERS["idefics3"].connector_prefixes == idefics3.CONNECTOR_PREFIXES
    assert ADAPTERS["qwen2_vl"].vision_prefixes == qwen2_vl.VISUAL_PREFIXES
    assert ADAPTERS["qwen3_vl"].vision_prefixes == qwen3_vl.VISION_PREFIXES


def _fail_if_model_code_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import rx_service.engine
    import shared.split as split
    import tx_service.engine

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("model code ran before the weights were checked")

    for module in (split, rx_service.engine):
        monkeypatch.setattr(module, "load_rx_half", boom)
    for module in (split, tx_service.engine):
        monkeypatch.setattr(module, "load_tx_half", boom)
    monkeypatch.setattr(split, "adapter_for", boom)


def test_a_folder_without_weights_fails_before_any_model_code(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    from rx_service.engine import RxEngine
    from shared.config import RxSettings, TxSettings
    from tx_service.engine import TxEngine

    empty = tmp_path / "no-weights"
    empty.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, empty / f.name)
    _fail_if_model_code_runs(monkeypatch)
    with pytest.raises(ModelError, match=r"has no \*\.safetensors weights"):
        RxEngine.load(RxSettings(model=str(empty), cache_dir=cache_dir))
    with pytest.raises(ModelError, match=r"has no \*\.safetensors weights"):
        TxEngine.load(TxSettings(model=str(empty), cache_dir=cache_dir))


def test_a_sharded_folder_missing_a_shard_names_it(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    from rx_service.engine import RxEngine
    from shared.config import RxSettings

    partial = tmp_path / "partial"
    shutil.copytree(sharded, partial)
    (partial / "model-00003-of-00003.safetensors").unlink()
    _fail_if_model_code_runs(monkeypatch)
    with pytest.raises(ModelError, match=r"lacks weight shards model-00003-of-00003\.safetensors"):
        RxEngine.load(RxSettings(model=str(partial), cache_dir=cache_dir))
    # The Tx (after the vision tower) needs only shard 1: the check passes for it.
    registry.check_weights(partial, ("model.vision_tower.", "vision_tower."))


def test_offline_hub_id_not_in_the_cache_says_how_to_fetch_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(registry, "fetch_checkpoint", lambda *a, **k: pytest.fail("downloaded offline"))
    with pytest.raises(ModelError) as info:
        registry.resolve_model("acme/never-downloaded", tmp_path)
    message = str(info.value)
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "hf download acme/never-downloaded" in message
    assert str(offline_error("x/y")).count("\n") == 0


def test_online_hub_id_is_fetched_for_the_tx_part_only(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = FakeHub(sharded, tmp_path)
    real_fetch = registry.fetch_checkpoint
    monkeypatch.setattr(
        registry, "fetch_checkpoint", lambda repo, prefixes_for: real_fetch(repo, prefixes_for, hub)
    )
    folder = registry.resolve_model(REPO_ID, tmp_path, tx_split=SplitPoint.AFTER_VISION_TOWER)
    assert folder == hub.snapshot
    assert [f for f in hub.downloaded if f.endswith(".safetensors")] == ["model-00001-of-00003.safetensors"]


def test_hf_hub_lists_sizes_and_lfs_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    """`HfHub` reads names, sizes and LFS sha256 from huggingface_hub's model info (no network)."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    from shared.models.hub import HfHub

    siblings = [
        RepoSibling("config.json", size=512),
        RepoSibling("model-00001-of-00002.safetensors", size=10, lfs=BlobLfsInfo(10, "ab" * 32, 134)),
    ]
    monkeypatch.setattr(
        HfApi,
        "model_info",
        lambda self, repo, files_metadata: SimpleNamespace(sha="c0ffee", siblings=siblings),
    )
    revision, files = HfHub().list_files(REPO_ID)
    assert revision == "c0ffee"
    assert files == [
        RemoteFile("config.json", 512, ""),
        RemoteFile("model-00001-of-00002.safetensors", 10, "ab" * 32),
    ]
