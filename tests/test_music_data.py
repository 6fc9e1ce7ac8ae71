"""Music datasets: a MAESTRO-shaped directory (scripts/make_maestro_like.py) drives the real loader; chorales;
snippets; CLI."""
from __future__ import annotations

import io
import json
import logging
import wave

import numpy as np
import pandas as pd
import pytest
import torch

from scripts import make_maestro_like
from scripts.make_maestro_like import write_maestro_like
from tda_core.cli import main
from tda_core.data import REGISTRY, load_dataset
from tda_core.data import midi_codec as mc
from tda_core.data import music
from tda_core.data.snippets import RELEASE_S, piano_roll, snippet, to_midi_bytes, to_wav_bytes
from tda_core.errors import UserError
from tda_core.objectives import IGNORE
from tda_core.store import spec_key
from tda_core.tasks import EPOCHS_ENV, get_task


# (file, split, notes): 300 notes -> about 1200 tokens -> 4 windows of 256; 0 notes -> a corrupt file
FILES = [("2018/a.midi", "train", 300), ("2018/b.midi", "train", 300), ("2017/c.midi", "train", 200),
         ("2017/d.midi", "test", 300), ("2017/e.midi", "validation", 300), ("2018/broken.midi", "train", 0),
         ("2018/f.midi", "test", 150)]


@pytest.fixture
def maestro_root(tmp_path):
    root = tmp_path / "data"
    write_maestro_like(root, FILES)
    return root


def test_maestro_loader_uses_csv_split_and_skips_corrupt_files(maestro_root, caplog):
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("maestro", maestro_root)
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 of 6" in warnings[0] and "broken.midi" in warnings[0]
    assert ds.kind == "music" and ds.class_names == ()
    assert ds.x_train.dtype == ds.y_train.dtype == torch.int64 and ds.x_train.shape[1] == mc.WINDOW
    table = music.window_table("maestro", maestro_root)
    files = dict(zip(table["source_index"], table["file"]))
    assert {files[int(i)] for i in ds.train_index} == {"2018/a.midi", "2018/b.midi", "2017/c.midi"}
    assert {files[int(i)] for i in ds.test_index} == {"2017/d.midi", "2018/f.midi"}
    assert "2017/e.midi" not in set(table["file"])  # validation files are not used
    # each window is the file's tokens at its offset: inputs, next-token targets, padding ignored
    tokens = {name: mc.encode_midi(music.maestro_csv(maestro_root).parent / name) for name, _, n in FILES if n}
    for split in ("train", "test"):
        x, y, index = ds.split(split)
        for i in range(len(x)):
            src = music.window_source("maestro", int(index[i]), maestro_root)
            ref_x, ref_y = mc.cut_window(tokens[src["file"]], src["token_offset"])
            assert (x[i].numpy() == ref_x).all() and (y[i].numpy() == ref_y).all()
    assert (ds.y_train == IGNORE).sum() + (ds.y_test == IGNORE).sum() > 0  # last windows are padded
    assert (ds.x_train[ds.y_train == IGNORE] == mc.PAD).all()


def test_maestro_like_script_writes_piano_performances_that_the_loader_reads(tmp_path):
    args = ["--train", "2", "--test", "1", "--validation", "1", "--notes", "400"]
    assert make_maestro_like.main([str(tmp_path / "data"), *args]) == 0
    csv = music.maestro_csv(tmp_path / "data")
    table = pd.read_csv(csv)
    assert csv.name == "maestro-v3.0.0.csv" and list(table["split"]) == ["train", "train", "test", "validation"]
    ds = load_dataset("maestro", tmp_path / "data")
    assert ds.n_train >= 8 and ds.n_test >= 4  # about 4 tokens a note: 6 windows of 256 per file
    midi = mc.read_midi(csv.parent / table["midi_filename"][0])
    assert table["duration"][0] == pytest.approx(midi.get_end_time(), abs=1e-3)
    piano = midi.instruments[0]
    assert piano.program == 0 and len(piano.notes) >= 400
    velocities = np.array([n.velocity for n in piano.notes])
    pitches = np.array([n.pitch for n in piano.notes])
    assert velocities.std() > 8 and 15 <= velocities.min() and velocities.max() <= 125  # dynamics, not one level
    assert pitches.min() < 55 and pitches.max() > 72  # both hands
    pedal = [c.value >= 64 for c in sorted(piano.control_changes, key=lambda c: c.time) if c.number == 64]
    assert len(pedal) > 20 and pedal[::2] == [True] * len(pedal[::2]) and not any(pedal[1::2])  # down, up, ...
    held, dry = mc.midi_notes(midi, sustain=True), mc.midi_notes(midi, sustain=False)
    assert sum(n.end - n.start for n in held) > 1.5 * sum(n.end - n.start for n in dry)  # the pedal sustains
    assert make_maestro_like.main([str(tmp_path / "again"), *args]) == 0  # the same arguments, the same bytes
    again = music.maestro_csv(tmp_path / "again")
    assert all((again.parent / f).read_bytes() == (csv.parent / f).read_bytes() for f in table["midi_filename"])


def test_epochs_override_shortens_a_recipe_under_its_own_store_key(monkeypatch, capsys):
    full = get_task("maestro-mt")
    monkeypatch.setenv(EPOCHS_ENV, "2")
    short = get_task("maestro-mt")
    assert (full.recipe.epochs, short.recipe.epochs) == (20, 2) and short.model_kwargs == full.model_kwargs
    assert spec_key({"task": short}) != spec_key({"task": full})
    monkeypatch.setenv(EPOCHS_ENV, "two")
    with pytest.raises(UserError, match="TDA_EPOCHS must be a positive whole number"):
        get_task("maestro-mt")
    assert main(["train", "--task", "digits-mlp"]) == 2 and "TDA_EPOCHS" in capsys.readouterr().err


def test_maestro_conversion_is_cached_and_sampling_follows_sizes(maestro_root, store):
    csv = music.maestro_csv(maestro_root)
    first = music.convert_maestro(csv, store)
    assert store.keys(music.CORPUS_KIND) and len(first.names) == 5
    again = music.convert_maestro(csv, store)
    assert (again.tokens == first.tokens).all() and again.names == first.names
    ds, table = music.music_dataset("maestro", first, "test", sizes=(4, 2), seed=3)
    assert (ds.n_train, ds.n_test) == (4, 2)
    assert set(table.loc[ds.train_index.numpy(), "split"]) == {"train"}
    ds2, _ = music.music_dataset("maestro", first, "test", sizes=(4, 2), seed=3)
    assert torch.equal(ds.train_index, ds2.train_index)


def test_missing_maestro_says_where_and_how(tmp_path):
    with pytest.raises(UserError, match="looked for maestro-v\\*/maestro-v\\*.csv in .*nowhere.*"
                                        "magenta.tensorflow.org/datasets/maestro"):
        load_dataset("maestro", tmp_path / "nowhere")
    status = REGISTRY["maestro"].locate(tmp_path / "nowhere")
    assert status.status == "missing"


def test_chorales_convert_once_into_the_store(store, monkeypatch):
    corpus = music.convert_chorales(store, limit=4)
    assert len(corpus.names) == 4 and corpus.names[0].startswith("bach/")
    assert sorted(corpus.splits).count("test") == 1
    assert all(corpus.piece(i)[-1] == mc.END for i in range(4))
    monkeypatch.setattr(music, "chorale_notes", lambda path: pytest.fail("converted twice"))
    again = music.convert_chorales(store, limit=4)
    assert (again.tokens == corpus.tokens).all() and again.splits == corpus.splits
    # four voices at a steady tempo: every note lasts at least a sixteenth and all voices sound at once
    notes = mc.decode_notes(corpus.piece(0))
    assert len({n.pitch for n in notes}) > 12 and min(n.end - n.start for n in notes) > 0.1


def test_chorale_snippet_renders_midi_piano_roll_and_audible_wav(store):
    corpus = music.convert_chorales(store, limit=3)
    ds, _ = music.music_dataset("chorales", corpus, "test")
    snip = snippet(ds, "test", 0)
    assert len(snip.notes) > 20 and snip.duration > 5
    back = mc.read_midi(to_midi_bytes(snip))
    assert sum(len(i.notes) for i in back.instruments) == len(snip.notes)
    data = to_wav_bytes(snip)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        seconds = w.getnframes() / w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    assert seconds == pytest.approx(snip.duration + RELEASE_S, abs=2 / 22050)
    assert np.sqrt(np.mean(pcm ** 2)) > 1000  # clearly audible, not silence
    assert (np.abs(pcm[: int(len(pcm) * 0.9)]) > 0).mean() > 0.5  # sound throughout, not one blip
    fig = piano_roll(snip)
    assert len(fig.data[0].y) == len(snip.notes) and fig.layout.xaxis.title.text == "time (s)"
    with pytest.raises(UserError, match="out of range"):
        snippet(ds, "test", ds.n_test)


def test_unigram_baseline_matches_counts(store):
    corpus = music.convert_chorales(store, limit=3)
    ds, _ = music.music_dataset("chorales", corpus, "test")
    counts = np.bincount(ds.y_train[ds.y_train >= 0].numpy(), minlength=mc.VOCAB_SIZE) + 1.0
    expected = -np.log(counts / counts.sum())[ds.y_test[ds.y_test >= 0].numpy()].mean()
    assert music.unigram_loss(ds) == pytest.approx(expected)


def test_snippet_cli_writes_midi_and_wav(maestro_root, tmp_path, capsys):
    mid, wav = tmp_path / "x.mid", tmp_path / "x.wav"
    assert main(["snippet", "--task", "maestro-mt", "--data-dir", str(maestro_root), "--split", "test",
                 "--index", "1", "--out", str(mid), "--wav", str(wav), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["file"] in {"2017/d.midi", "2018/f.midi"} and row["notes"] > 10 and row["audio"] == "piano"
    assert len(mc.read_midi(mid.read_bytes()).instruments[0].notes) == row["notes"]
    assert wav.read_bytes()[:4] == b"RIFF"
    assert main(["snippet", "--task", "maestro-mt", "--data-dir", str(maestro_root), "--index", "999",
                 "--out", str(mid)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_chorales_are_listed_as_to_convert_until_cached(tmp_path, store):
    assert REGISTRY["chorales"].kind == REGISTRY["maestro"].kind == "music"
    status = REGISTRY["chorales"].locate(tmp_path)  # the test's store is empty: `datasets` must not convert
    assert status.status == "to convert" and "first use" in status.where
