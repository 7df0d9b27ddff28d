"""The safetensors writer: reproducible bytes, one tensor produced at a time, nothing half-written."""

from __future__ import annotations

import gc
import hashlib
import json
import struct
import weakref
from pathlib import Path

import pytest
import torch
from diffsplit.engine.models.safetensors_io import PendingTensor, save_file_sorted, write_safetensors
from safetensors import safe_open


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        "b.weight": torch.randn(3, 5, generator=generator),
        "a.half": torch.randn(7, generator=generator).half(),
        "c.bf16": torch.randn(2, 2, generator=generator).to(torch.bfloat16),
        "d.flag": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5, dtype=torch.float64),
        "f.empty": torch.zeros(0),
        "g.ids": torch.arange(4, dtype=torch.int64),
        "h.strided": torch.randn(4, 6, generator=generator).T,
    }


def test_what_is_written_reads_back_equal_through_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    save_file_sorted(tensors, path, metadata={"z": "1", "a": "2"})
    with safe_open(str(path), framework="pt") as opened:
        assert sorted(opened.keys()) == sorted(tensors)
        assert opened.metadata() == {"z": "1", "a": "2"}
        for key, tensor in tensors.items():
            read = opened.get_tensor(key)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), key


def test_the_same_tensors_give_the_same_bytes_whatever_the_order_given(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file_sorted(tensors, tmp_path / "one.safetensors", metadata={"b": "x", "a": "y"})
    save_file_sorted(dict(reversed(list(tensors.items()))), tmp_path / "two.safetensors",
                     metadata={"a": "y", "b": "x"})
    one, two = ((tmp_path / name).read_bytes() for name in ("one.safetensors", "two.safetensors"))
    assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()
    (length,) = struct.unpack("<Q", one[:8])
    header = json.loads(one[8 : 8 + length])
    assert list(header) == sorted(header)
    assert (8 + length) % 8 == 0
    for key, entry in header.items():
        if key != "__metadata__":
            size = tensors[key].element_size()
            assert entry["data_offsets"][0] % size == 0, f"{key} is not aligned to its element size"


def test_tensors_are_produced_one_at_a_time(tmp_path: Path) -> None:
    alive: list[weakref.ref[torch.Tensor]] = []
    most_alive = 0

    def producer(seed: int):
        def produce() -> torch.Tensor:
            nonlocal most_alive
            gc.collect()
            most_alive = max(most_alive, sum(ref() is not None for ref in alive) + 1)
            tensor = torch.full((256,), float(seed))
            alive.append(weakref.ref(tensor))
            return tensor
        return produce

    pending = {f"t{index}": PendingTensor(torch.float32, (256,), producer(index)) for index in range(6)}
    write_safetensors(pending, tmp_path / "s.safetensors")
    assert len(alive) == 6 and most_alive == 1
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as opened:
        assert [float(opened.get_tensor(f"t{index}")[0]) for index in range(6)] == [0, 1, 2, 3, 4, 5]


def test_a_tensor_that_does_not_fit_its_header_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    pending = {"x": PendingTensor(torch.float32, (3,), lambda: torch.zeros(4))}
    with pytest.raises(ValueError, match=r"not the torch\.float32 \(3,\)"):
        write_safetensors(pending, path)
    assert list(tmp_path.iterdir()) == []
