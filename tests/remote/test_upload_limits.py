"""What peers may upload to a real worker: file kinds, where files land, how many and how big, whose.

Each attack here was run against a ``diffsplit worker --allow-upload``: any
file type accepted, files planted inside a diffusers folder, thousands of
unfinished uploads declaring 16 GiB each, one client truncating another's
upload of the same file. The worker must refuse each clearly and keep the
legitimate upload intact.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.remote.errors import BadRequest
from diffsplit.remote.uploads import PARTS_FOLDER, UploadLimits, UploadReceiver
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_ops import UploadChunk

from .test_bounded_work import started_worker

MIB = 1 << 20


@contextmanager
def upload_worker(store: Path, *extra: str) -> Iterator[str]:
    with started_worker(store, "--allow-upload", "--insecure", *extra) as address:
        yield address


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with a diffusers pipeline folder, and a vae folder that is itself a model directory."""
    root = tmp_path_factory.mktemp("upload-store")
    pipe = root / "diffusers" / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "config.json").write_text("{}")
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text("{}")
    (root / "loras").mkdir()
    return root


@pytest.fixture(scope="module")
def worker(store: Path) -> Iterator[str]:
    # a huge per-file limit, so that the disk's free space is what refuses the biggest declarations
    with upload_worker(store, "--max-upload-gb", "1e9", "--max-uploads-per-client", "2") as address:
        yield address


def chunk(folder: str, name: str, data: bytes, *, offset: int = 0, total: int | None = None,
          final: bool = True, sha256: str | None = None) -> dict[str, Any]:
    return {
        "op": "upload", "folder": folder, "name": name, "offset": offset,
        "sha256": sha256 or hashlib.sha256(data).hexdigest(),
        "total_bytes": len(data) if total is None else total,
        "data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else b"", "final": final,
    }


def start(client: Client, folder: str, name: str, whole: bytes, first: int) -> dict[str, Any]:
    """The first ``first`` bytes of ``whole`` (an upload left unfinished)."""
    header = chunk(folder, name, whole[:first], total=len(whole), final=False,
                   sha256=hashlib.sha256(whole).hexdigest())
    return client.request(header, timeout=30)


def refused(reply: dict[str, Any], kind: str = "BadRequest") -> str:
    assert reply["op"] == "error", f"expected a refusal, got {reply}"
    assert reply["error"]["kind"] == kind, reply["error"]
    return str(reply["error"]["message"])


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def test_only_files_read_without_unpickling_are_taken(worker: str, store: Path) -> None:
    with Client(worker) as client:
        refused_kinds = [("loras", "x.py"), ("loras", "x.ckpt"), ("checkpoints", "evil.pt"),
                         ("loras", "x.bin"), ("configs", "c.safetensors"), ("loras", ".hidden.safetensors")]
        for folder, name in refused_kinds:
            message = refused(client.request(chunk(folder, name, b"import os"), timeout=30))
            assert name in message
            assert not (store / folder / name).exists()
        assert "only .safetensors, .sft" in refused(client.request(chunk("loras", "x.py", b"x"), timeout=30))
        weights = client.request(chunk("loras", "fine.safetensors", b"weights"), timeout=30)
        assert weights["op"] == "result" and weights["installed"] == "fine.safetensors"
        config = client.request(chunk("configs", "v1.yaml", b"model: {}\n"), timeout=30)
        assert config["op"] == "result" and (store / "configs" / "v1.yaml").read_bytes() == b"model: {}\n"


def test_uploads_never_land_in_a_model_directory_or_a_sub_folder(worker: str, store: Path) -> None:
    pipe = store / "diffusers" / "pipe"
    before = files_under(pipe)
    with Client(worker) as client:
        planted = refused(client.request(chunk("diffusers", "pipe/unet/extra.safetensors", b"x"), timeout=30))
        assert "sub-folder" in planted and str(store) not in planted
        assert "sub-folder" in refused(client.request(chunk("loras", "sd15/x.safetensors", b"x"), timeout=30))
        inside = refused(client.request(chunk("vae", "extra.safetensors", b"x"), timeout=30))
        assert "model directory" in inside
    assert files_under(pipe) == before
    assert not (store / "loras" / "sd15").exists() and not (store / "vae" / "extra.safetensors").exists()


def test_unfinished_uploads_are_capped_per_client_and_by_the_disk(worker: str, store: Path) -> None:
    with Client(worker) as greedy, Client(worker) as other:
        whole = [bytes([n]) * MIB for n in range(10)]
        replies = [start(greedy, "loras", f"part{n}.safetensors", data, 16) for n, data in enumerate(whole)]
        assert [reply["op"] for reply in replies[:2]] == ["result", "result"]
        for reply in replies[2:]:
            assert "2 unfinished upload(s)" in refused(reply)
        assert start(other, "loras", "other.safetensors", b"o" * MIB, 16)["op"] == "result"
        # declaring more than the disk holds, or more than the worker takes, is refused before writing
        sha = hashlib.sha256(b"big").hexdigest()
        too_big = chunk("loras", "huge.safetensors", b"b", total=2**59, final=False, sha256=sha)
        assert "does not fit on the worker's disk" in refused(other.request(too_big, timeout=30))
        over = chunk("loras", "huger.safetensors", b"b", total=2**62, final=False, sha256=sha)
        assert "over the worker's limit" in refused(other.request(over, timeout=30))
        # the greedy client finishing one frees its place
        rest = chunk("loras", "part0.safetensors", whole[0][16:], offset=16, total=MIB,
                     sha256=hashlib.sha256(whole[0]).hexdigest())
        assert greedy.request(rest, timeout=30)["op"] == "result"
        assert (store / "loras" / "part0.safetensors").read_bytes() == whole[0]
        assert start(greedy, "loras", "part5.safetensors", whole[5], 16)["op"] == "result"


def test_a_second_client_cannot_truncate_or_take_over_an_upload_under_way(worker: str, store: Path) -> None:
    data = bytes(range(256)) * 256
    with Client(worker) as first, Client(worker) as second:
        assert start(first, "loras", "shared.safetensors", data, len(data) // 2)["op"] == "result"
        same_file = refused(second.request(chunk("loras", "copy.safetensors", data), timeout=30))
        assert "under way" in same_file
        same_name = refused(second.request(chunk("loras", "shared.safetensors", b"other"), timeout=30))
        assert "under way" in same_name
        continued = chunk("loras", "shared.safetensors", data[len(data) // 2:], offset=len(data) // 2,
                          total=len(data), sha256=hashlib.sha256(data).hexdigest())
        assert "another upload" in refused(second.request(continued, timeout=30))
        assert first.request(continued, timeout=30)["op"] == "result"
    assert (store / "loras" / "shared.safetensors").read_bytes() == data
    assert not (store / "loras" / "copy.safetensors").exists()


def test_an_idle_unfinished_upload_is_dropped_with_its_file(tmp_path: Path) -> None:
    store = tmp_path / "models"
    (store / "loras").mkdir(parents=True)
    with upload_worker(store, "--max-uploads-per-client", "1", "--upload-idle-s", "1") as address, \
            Client(address) as client:
        assert start(client, "loras", "a.safetensors", b"a" * 1000, 10)["op"] == "result"
        assert "unfinished" in refused(start(client, "loras", "b.safetensors", b"b" * 1000, 10))
        time.sleep(2.5)  # idle past --upload-idle-s: the next upload drops it
        assert start(client, "loras", "b.safetensors", b"b" * 1000, 10)["op"] == "result"
        parts = sorted(p.name for p in (store / PARTS_FOLDER).iterdir())
        assert parts == [f"{hashlib.sha256(b'b' * 1000).hexdigest()}.part"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_receiver_expires_idle_parts_and_lets_a_client_start_over(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    clock = Clock()
    receiver = UploadReceiver(tmp_path, UploadLimits(max_file_bytes=MIB, idle_s=60), clock=clock)
    data = b"w" * 100
    header = chunk("loras", "w.safetensors", data[:10], total=100, final=False,
                   sha256=hashlib.sha256(data).hexdigest())
    assert receiver.receive(UploadChunk.parse(header), "alice") is None
    assert receiver.receive(UploadChunk.parse(header), "alice") is None  # the same client may start over
    with pytest.raises(BadRequest, match="under way"):
        receiver.receive(UploadChunk.parse(header), "bob")
    clock.now = 61
    assert receiver.expire() == 1 and receiver.unfinished() == 0
    assert list((tmp_path / PARTS_FOLDER).iterdir()) == []
    rest = chunk("loras", "w.safetensors", data[10:], offset=10, total=100,
                 sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(BadRequest, match="start again at offset 0"):
        receiver.receive(UploadChunk.parse(rest), "alice")
    assert receiver.receive(UploadChunk.parse(header), "bob") is None
    assert receiver.receive(UploadChunk.parse(rest), "bob") == tmp_path / "loras" / "w.safetensors"
    assert (tmp_path / "loras" / "w.safetensors").read_bytes() == data
