"""Store round trip, stable keys, corruption recovery, concurrent writers."""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass

import torch

from tda_core.store import Store, spec_key


@dataclass(frozen=True)
class Spec:
    name: str
    seed: int
    sizes: tuple[int, ...] = (1, 2)


def test_round_trip_and_metadata(store):
    tensors = {"w": torch.randn(3, 4), "idx": torch.arange(5)}
    store.save("things", "k1", tensors, {"note": "hello", "n": 3})
    art = store.load("things", "k1")
    assert torch.equal(art.tensors["w"], tensors["w"]) and torch.equal(art.tensors["idx"], tensors["idx"])
    assert art.meta == {"note": "hello", "n": 3} and art.nbytes > 0
    assert store.keys("things") == ["k1"] and store.meta("things", "k1")["n"] == 3
    assert store.load("things", "absent") is None
    assert store.summary().set_index("kind").loc["things", "artifacts"] == 1


def test_spec_key_is_stable_and_sensitive():
    assert spec_key(Spec("a", 1)) == spec_key(Spec("a", 1))
    assert spec_key(Spec("a", 1)) != spec_key(Spec("a", 2))
    assert spec_key({"b": 1, "a": 2}) == spec_key({"a": 2, "b": 1})
    assert len({spec_key(Spec("a", 1, (1, 2))), spec_key(Spec("a", 1, (2, 1)))}) == 2


def test_get_or_create_computes_once(store):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.ones(2)}, {"v": 1}

    a, loaded_a = store.get_or_create("k", "key", compute)
    b, loaded_b = store.get_or_create("k", "key", compute)
    assert (loaded_a, loaded_b) == (False, True) and len(calls) == 1
    assert torch.equal(a.tensors["x"], b.tensors["x"])


def test_truncated_or_flipped_file_is_detected_and_recomputed(store, caplog):
    store.save("k", "t", {"x": torch.arange(1000.0)}, {})
    path = store.root / "k" / "t.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with caplog.at_level("WARNING"):
        assert store.load("k", "t") is None
    assert "corrupt" in caplog.text and not store.has("k", "t")

    store.save("k", "f", {"x": torch.arange(1000.0)}, {})
    path = store.root / "k" / "f.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the payload: still parses, checksum catches it
    path.write_bytes(bytes(data))
    art, loaded = store.get_or_create("k", "f", lambda: ({"x": torch.arange(1000.0)}, {"again": True}))
    assert not loaded and art.meta == {"again": True}
    assert torch.equal(store.load("k", "f").tensors["x"], torch.arange(1000.0))


def test_json_without_tensor_file_counts_as_missing(store):
    store.save("k", "j", {"x": torch.ones(1)}, {})
    (store.root / "k" / "j.safetensors").unlink()
    assert store.load("k", "j") is None


def _writer(root: str, worker: int, out: "mp.Queue") -> None:
    store = Store(root)

    def compute():
        time.sleep(0.5)  # long enough for the other process to be waiting on the lock
        return {"x": torch.full((1000,), float(worker))}, {"by": worker}

    art, loaded = store.get_or_create("race", "same", compute)
    out.put((worker, loaded, art.meta["by"], float(art.tensors["x"][0])))


def test_two_processes_same_key_compute_once(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "s"), w, out)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = sorted(out.get(timeout=5) for _ in procs)
    assert sorted(r[1] for r in results) == [False, True]  # one computed, the other loaded
    winner = {r[2] for r in results}
    assert len(winner) == 1 and {r[3] for r in results} == {float(winner.pop())}
    files = list((tmp_path / "s" / "race").glob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    record = json.loads((tmp_path / "s" / "race" / "same.json").read_text())
    assert record["meta"]["by"] in (1, 2)
