"""The worker hashes its store in the background at start; a lookup meanwhile never hashes twice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from diffsplit.engine.store import ModelStore
from diffsplit.remote.store_indexer import StoreIndexer


@pytest.fixture
def store(models_dir: Path, tmp_path: Path) -> ModelStore:
    root = tmp_path / "models"
    for folder in ("checkpoints", "loras", "vae"):
        shutil.copytree(models_dir / folder, root / folder)
    return ModelStore(root, index_path=tmp_path / "index.json")


def test_the_walk_hashes_every_model_and_logs_a_summary(
    store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    indexer = StoreIndexer(store)
    with caplog.at_level("INFO", logger="diffsplit.remote.store_indexer"):
        indexer.start()
        summary = indexer.wait(60)
        indexer.stop()
    listed = [f"{folder}/{name}" for folder in store.folders() for name in store.names(folder)]
    assert summary is not None and summary.complete and summary.models == len(listed) > 0
    assert summary.bytes == sum((store.root / name).stat().st_size for name in listed)
    assert set(store._index.fresh_entries()) == set(listed)
    assert any("indexed" in record.getMessage() and "model(s)" in record.getMessage()
               for record in caplog.records)


def test_after_the_walk_nothing_is_hashed_again(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    indexer = StoreIndexer(store)
    indexer.start()
    indexer.wait(60)
    indexer.stop()
    entry = store._index.fresh_entries()["checkpoints/tiny-sd15.safetensors"]

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr("diffsplit.engine.store.file_sha256", no_hashing)  # a fault, if anything hashes
    found = store.find(sha256=entry.sha256, folder="checkpoints")
    assert found == store.resolve("checkpoints", "tiny-sd15.safetensors")
    assert store.index_all().complete  # a second walk finds everything fresh


def test_a_stopped_walk_says_it_did_not_finish(store: ModelStore) -> None:
    indexer = StoreIndexer(store)
    indexer._stop.set()  # stop asked before the first model
    indexer.start()
    summary = indexer.wait(60)
    assert summary is not None and not summary.complete and summary.models == 0
