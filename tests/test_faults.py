"""Faults on purpose: processes killed mid-work, damaged artifacts, racing processes, a full or read-only store.

The long randomized versions (random kill times, N trials each) are `python -m benchmarks.bench_faults`.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tda_core import store as store_module
from tda_core.cli import main
from tda_core.experiments import LDS_KIND
from tda_core.store import Store

from tests import fault_harness as fh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    """Forks the worker processes (one import for the module instead of one per process)."""
    z = fh.Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture
def tiny_registry():
    """`digits-tiny` and the `tiny` grid in this process (the workers register their own)."""
    with fh.tiny_registered():
        yield


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run of each command, each in its own store."""
    root = tmp_path_factory.mktemp("reference")
    for name, args in fh.COMMANDS.items():
        assert fh.run_here(args, root / name) == 0
    return {name: root / name for name in fh.COMMANDS}


def _durable_total(root: Path) -> int:
    """Marker and table writes of an uninterrupted run: one per artifact and one per table row."""
    return len(fh.stored(root)) + len(fh.table_rows(root))


# --- SIGKILL mid-work, then rerun --------------------------------------------------------------------
KILLS = [("train", "marker:3"),  # two checkpoints stored, the third's tensors written but not its marker
         ("ground-truth", "save:4"),  # three subset models stored, the fourth trained but not yet written
         ("attribute", "tensor:4"),  # half of a member's feature file written when it dies
         ("sweep", "table:2")]  # one setting in the table, the second computed but not recorded


@pytest.mark.parametrize(("command", "fault"), KILLS, ids=[c for c, _ in KILLS])
def test_killed_mid_work_then_rerun_equals_an_uninterrupted_run(command, fault, references, zygote, tmp_path):
    store, audit = tmp_path / "store", tmp_path / "audit"
    rc, _, _ = zygote.run(fh.COMMANDS[command], store, audit, fault=fault)
    assert rc == -9  # SIGKILL
    total = _durable_total(references[command])
    done = len(fh.durable_writes(audit))
    assert 0 < done < total, "the kill must land inside the work"
    reference = fh.stored(references[command])
    assert fh.wrong_artifacts(store, reference) == []  # what survived the kill loads with the right contents

    survived, rows = fh.markers(store), fh.table_rows(store)
    assert len(survived) + len(rows) == done  # the audit's count of durable writes matches the store's
    assert fh.run_here(fh.COMMANDS[command], store) == 0
    assert fh.same_as_reference(store, reference) == []
    assert fh.leftovers(store) == []  # the rerun rewrote the torn key and removed the dead writer's temp file
    after = fh.markers(store)
    # what was durable was read, not redone; `run` rewrites a setting's per-example LDS record (derived from
    # stored scores in milliseconds) each time it runs, and the setting killed before its row reruns
    kept = {k: v for k, v in survived.items() if not k.startswith(f"{LDS_KIND}/")}
    assert {k: after[k] for k in kept} == kept
    assert len(after) + len(fh.table_rows(store)) == total
    assert fh.table_rows(store).head(len(rows)).equals(rows)
    if command == "sweep":
        rows = fh.table_rows(store)
        assert sorted(rows["setting_key"]) == sorted(fh.table_rows(references[command])["setting_key"])
        assert torch.allclose(torch.tensor(rows.sort_values("setting_key")["lds"].to_numpy()),
                              torch.tensor(fh.table_rows(references[command]).sort_values("setting_key")["lds"]
                                           .to_numpy()))


# --- races ----------------------------------------------------------------------------------------------
def _app(call: str, out: Path, ensemble: dict, method: dict | None = None) -> dict:
    return {"call": call, "task": fh.TINY, "out": str(out), "ensemble": ensemble, "eval": {"M": 8},
            "method": method or {"name": "grad-dot", "proj": "kron", "proj_dim": 64}}


def _writes(audit: Path) -> collections.Counter:
    return collections.Counter(fh.durable_writes(audit))


def test_cli_and_app_racing_on_one_attribution_compute_it_once(zygote, tmp_path):
    store, audit = tmp_path / "store", tmp_path / "audit"
    cli_out, app_out = tmp_path / "cli.safetensors", tmp_path / "app.safetensors"
    workers = [zygote.start([*fh.COMMANDS["attribute"], "--save-scores", str(cli_out)], store, audit, barrier=2),
               zygote.start([], store, audit, barrier=2,
                            app=_app("attribute", app_out, {"kind": "dropout", "I": 2, "D": 2}))]
    assert [w.wait()[0] for w in workers] == [0, 0]
    twice = {k: n for k, n in _writes(audit).items() if n > 1 and k[0] in fh.EXPENSIVE}
    assert twice == {}
    assert len([k for k in _writes(audit) if k[0] == "features"]) == 4
    from safetensors.torch import load_file

    a, b = load_file(str(cli_out))["scores"], load_file(str(app_out))["scores"]
    stored = [t["scores"] for (kind, _), t in fh.stored(store).items() if kind == "scores"]
    assert len(stored) == 1 and torch.equal(a, b) and torch.equal(a, stored[0])


def test_two_sweeps_and_two_app_sessions_record_every_setting_once(zygote, tmp_path, references):
    store, audit = tmp_path / "store", tmp_path / "audit"
    method = {"name": "grad-dot", "proj": "kron", "damping": None}
    workers = [zygote.start(fh.COMMANDS["sweep"], store, audit, barrier=4) for _ in range(2)]
    workers += [zygote.start([], store, audit, barrier=4, app=_app("run", tmp_path / f"app{i}.json", ensemble, method))
                for i, ensemble in enumerate([{"kind": "naive", "I": 2}, {"kind": "dropout", "I": 1, "D": 2}])]
    results = [w.wait() for w in workers]
    assert [r[0] for r in results] == [0] * 4, [r[2][-400:] for r in results]
    twice = {k: n for k, n in _writes(audit).items() if n > 1 and k[0] in fh.EXPENSIVE}
    assert twice == {}
    rows, ref = fh.table_rows(store), fh.table_rows(references["sweep"])
    assert len(rows) == len(ref) == 3 and sorted(rows["setting_key"]) == sorted(ref["setting_key"])  # none lost or twice
    lds = dict(zip(rows["setting_key"], rows["lds"]))
    assert all(abs(lds[k] - v) < 1e-6 for k, v in zip(ref["setting_key"], ref["lds"]))
    for i in range(2):  # each app session read the recorded value
        assert json.loads((tmp_path / f"app{i}.json").read_text())["lds"] in set(rows["lds"])


# --- damaged artifacts ------------------------------------------------------------------------------------
DAMAGE = [(suffix, how) for suffix in (".safetensors", ".json") for how in fh.DAMAGES]


TRAIN_TWO = ["train", "--task", fh.TINY, "--seeds", "0-1", "--json"]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A store with two trained tiny checkpoints and the rows `train` printed for them."""
    root = tmp_path_factory.mktemp("two") / "store"
    out = io.StringIO()
    with fh.tiny_registered(), contextlib.redirect_stdout(out):
        assert main([*TRAIN_TWO, "--store", str(root)]) == 0
    return root, json.loads(out.getvalue())


@pytest.mark.parametrize(("suffix", "how"), DAMAGE, ids=[f"{s[1:]}-{h}" for s, h in DAMAGE])
def test_damaged_checkpoint_is_reported_in_one_line_and_retrained(suffix, how, two_checkpoints, tiny_registry,
                                                                  capsys, caplog):
    pristine, first = two_checkpoints
    store = Store()
    shutil.copytree(pristine, store.root)
    fh.damage(store.root / "checkpoints" / f"{first[0]['key']}{suffix}", how)
    with caplog.at_level("WARNING"):
        assert main(TRAIN_TWO) == 0
    second = json.loads(capsys.readouterr().out)
    assert [r["from_store"] for r in second] == [False, True]  # the damaged one retrained, the other read
    assert [r["test_accuracy"] for r in second] == [r["test_accuracy"] for r in first]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and first[0]["key"] in warnings[0] and "\n" not in warnings[0]
    assert "recomputed" in warnings[0], warnings[0]
    assert fh.same_as_reference(store.root, fh.stored(pristine)) == [] and fh.leftovers(store.root) == []


def test_every_marker_byte_flip_is_detected(store):
    """A flip of any single byte of a marker is caught: the marker carries a checksum of its fields."""
    store.save("k", "m", {"x": torch.arange(4.0)}, {"train_s": 1.25, "seed": 3})
    path = store.root / "k" / "m.json"
    good = path.read_bytes()
    undetected = []
    for at in range(len(good)):
        data = bytearray(good)
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        art = store.load("k", "m")
        if art is not None:
            undetected.append((at, chr(good[at])))
        store.save("k", "m", {"x": torch.arange(4.0)}, {"train_s": 1.25, "seed": 3})
    # flipping the low bit of JSON whitespace or of a separator can leave an equal document
    assert all(c in " \n\t" for _, c in undetected), undetected


def test_markers_written_before_checksums_still_load(store):
    """A store written by earlier code (marker without size or marker checksum) is read as it is."""
    from safetensors.torch import save_file

    folder = store.root / "checkpoints"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(folder / "old.safetensors"))
    digest = store_module._sha256(folder / "old.safetensors")
    (folder / "old.json").write_text(json.dumps({"format": 1, "kind": "checkpoints", "key": "old", "sha256": digest,
                                                 "meta": {"train_s": 2.0}}, indent=1))
    art = store.load("checkpoints", "old")
    assert art is not None and art.meta == {"train_s": 2.0} and torch.equal(art.tensors["w"], torch.ones(3))


# --- a full or read-only store ----------------------------------------------------------------------------
def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _stored_tensors(root: Path) -> dict:
    return {k: v for k, v in fh.stored(root).items()}


def test_full_disk_injected_enospc_gives_one_line_and_leaves_nothing_half_written(tiny_registry, monkeypatch,
                                                                                  capsys):
    assert main(["train", "--task", fh.TINY, "--seeds", "0-1", "--json"]) == 0
    capsys.readouterr()
    before = _stored_tensors(Store().root)
    real = store_module._write_all

    def half_then_full(fd: int, data: bytes) -> None:
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module, "_write_all", half_then_full)
    assert main(["train", "--task", fh.TINY, "--seeds", "0-3", "--json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(Store().root) in line and "No space left on device" in line and "free some space" in line
    assert fh.leftovers(Store().root) == []
    after = _stored_tensors(Store().root)
    assert after.keys() == before.keys() and all(fh.tensors_differ(after[k], before[k]) is None for k in before)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root); unmounted afterwards."""
    if not fh.can_mount():
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC test covers the same path")
    with fh.small_disk(tmp_path / "disk") as disk:
        yield disk


def test_full_tmpfs_store_one_line_exit_2_earlier_artifacts_intact(small_disk, tiny_registry, capsys):
    store = small_disk / "store"
    assert main(["train", "--task", fh.TINY, "--seeds", "0-1", "--store", str(store), "--json"]) == 0
    capsys.readouterr()
    before = _stored_tensors(store)
    fh.fill(small_disk, leave=16 * 1024)  # less than a checkpoint
    assert main(["train", "--task", fh.TINY, "--seeds", "0-3", "--store", str(store), "--json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(store) in line and "No space left on device" in line
    assert fh.leftovers(store) == []
    after = _stored_tensors(store)
    assert after.keys() == before.keys() and all(fh.tensors_differ(after[k], before[k]) is None for k in before)


def test_feature_cache_larger_than_the_disk_is_refused_before_any_work(small_disk, tiny_registry, capsys):
    store = small_disk / "store"  # 2 MiB; one member's digits features at k = 2048 take 12 MiB
    args = ["attribute", "--task", fh.TINY, "--method", "grad-dot", "--proj", "kron", "--store", str(store), "--json"]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "GB is free" in line and "members fit" in line
    assert fh.stored(store) == {}  # nothing trained, nothing cached


def test_feature_cache_larger_than_the_free_space_is_refused_without_root(tiny_registry, monkeypatch, capsys):
    """The same check where no tmpfs can be mounted: the file system reports 2 MiB free."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("tda_core.attribution.shutil.disk_usage", lambda path: usage(2 << 20, 0, 2 << 20))
    assert main(["attribute", "--task", fh.TINY, "--method", "grad-dot", "--proj", "kron", "--json"]) == 2
    assert "members fit" in _one_error_line(capsys.readouterr().err) and fh.stored(Store().root) == {}


def test_memory_budget_too_small_is_refused_before_any_work(tiny_registry, monkeypatch, capsys):
    monkeypatch.setenv("TDA_MEMORY_BUDGET_GB", "0.001")
    assert main(["attribute", "--task", fh.TINY, "--method", "trak", "--proj", "dense", "--json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "memory budget is 0.00 GB" in line
    assert fh.stored(Store().root) == {}


@pytest.fixture
def read_only_place(tmp_path):
    """(folder, make_read_only): a folder that can be made read-only for real: a tmpfs remounted read-only as
    root, chmod a-w otherwise."""
    if os.geteuid() != 0:
        folder = tmp_path / "place"
        folder.mkdir()
        yield folder, lambda: [p.chmod(p.stat().st_mode & ~0o222) for p in [folder, *folder.rglob("*")]]
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
        return
    if not fh.can_mount():
        pytest.skip("root without mount: no way to make a read-only folder")
    with fh.small_disk(tmp_path / "place") as folder:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def test_read_only_store_serves_what_is_stored_and_refuses_new_work_in_one_line(read_only_place, tiny_registry,
                                                                                 capsys):
    folder, make_read_only = read_only_place
    store = folder / "store"
    assert main(["train", "--task", fh.TINY, "--seeds", "0-1", "--store", str(store), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    make_read_only()
    assert main(["train", "--task", fh.TINY, "--seeds", "0-1", "--store", str(store), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(r["from_store"] for r in again) and [r["key"] for r in again] == [r["key"] for r in first]
    assert main(["train", "--task", fh.TINY, "--seeds", "0-2", "--store", str(store), "--json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(store) in line and ("Read-only file system" in line or "Permission denied" in line)
    assert "writable" in line and len(fh.stored(store)) == 2


def test_store_names_cannot_leave_the_store(store):
    for kind, key in (("..", "x"), ("checkpoints", "../../etc/passwd"), ("/etc", "x"), ("a/b", "x"),
                      ("checkpoints", ""), ("checkpoints", ".hidden"), ("k", "a\x00b")):
        with pytest.raises(ValueError, match="not a plain name"):
            store.save(kind, key, {"x": torch.ones(1)}, {})
        with pytest.raises(ValueError, match="not a plain name"):
            store.load(kind, key)
    with pytest.raises(ValueError, match="not a plain name"):
        store.append_rows("../results", [{"a": 1}])


def test_threads_of_one_process_share_the_key_lock(store):
    """Streamlit runs sessions as threads: two threads computing one key compute it once."""
    import threading
    import time

    calls = []

    def compute():
        calls.append(threading.get_ident())
        time.sleep(0.3)
        return {"x": torch.ones(2)}, {}

    threads = [threading.Thread(target=store.get_or_create, args=("k", "shared", compute)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
