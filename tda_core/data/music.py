"""Music datasets: Bach chorales (music21's bundled corpus) and MAESTRO v2/v3 (user-provided), as event windows.

Each corpus is converted to event tokens once and cached in the Store (kind ``music-corpus``:
all pieces' tokens concatenated plus piece boundaries, names and splits). Windows are cut
from every piece; a window's source index is its running number over the whole corpus, and
`window_table` maps it back to file and token offset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import UserError
from ..progress import Progress, report, tqdm_progress
from ..store import Store, spec_key
from .base import Dataset, DatasetInfo, SourceStatus, load_dataset, register, sample_indices
from .midi_codec import (CODEC_VERSION, VOCAB_SIZE, WINDOW, MidiError, Note, cut_window, encode_notes,
                         load_midi_tokens, window_starts)

log = logging.getLogger(__name__)
CORPUS_KIND = "music-corpus"
SPLIT_SEED = 0
CHORALE_TEST_FRACTION = 0.3  # pieces held out: enough test windows for paired intervals of about +- 0.02
CHORALE_VELOCITY = 80
DEFAULT_BPM = 100.0
MAESTRO_SIZES = (5000, 178)
MAESTRO_HELP = ("download the MIDI-only archive maestro-v3.0.0-midi.zip (or v2.0.0) from "
                "https://magenta.tensorflow.org/datasets/maestro and unzip it there, or set --data-dir / "
                "TDA_DATA_DIR to the folder that holds maestro-v3.0.0/")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Pieces as event tokens (int16): piece i is ``tokens[offsets[i]:offsets[i + 1]]``."""

    names: tuple[str, ...]
    splits: tuple[str, ...]
    tokens: np.ndarray
    offsets: np.ndarray

    def piece(self, i: int) -> np.ndarray:
        """Tokens of piece i (ending with END)."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def _save_corpus(pieces: list[np.ndarray], names: list[str], splits: list[str],
                 meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    tokens = np.concatenate(pieces).astype(np.int16) if pieces else np.zeros(0, dtype=np.int16)
    return ({"tokens": torch.from_numpy(tokens), "offsets": torch.from_numpy(offsets)},
            {**meta, "names": names, "splits": splits, "n_tokens": int(len(tokens))})


def _corpus(tensors: dict[str, torch.Tensor], meta: dict) -> Corpus:
    return Corpus(tuple(meta["names"]), tuple(meta["splits"]), tensors["tokens"].numpy(), tensors["offsets"].numpy())


# --- Bach chorales ----------------------------------------------------------------------------------
def chorale_paths(limit: int | None = None) -> list[Path]:
    """Score files of music21's bundled Bach corpus (MusicXML and Humdrum; not the analyses)."""
    from music21 import corpus

    paths = sorted(p for p in corpus.getComposer("bach") if p.suffix in (".mxl", ".xml", ".krn"))
    return paths[:limit] if limit is not None else paths


def chorale_notes(path: Path) -> list[Note]:
    """All voices of one chorale as notes (ties joined) at its metronome mark, or 100 bpm without one."""
    from music21 import corpus, stream, tempo

    score = corpus.parse(str(path))
    marks = list(score.recurse().getElementsByClass(tempo.MetronomeMark))
    bpm = marks[0].getQuarterBPM() if marks and marks[0].getQuarterBPM() else DEFAULT_BPM
    sec = 60.0 / bpm
    spans: list[list[float]] = []
    for part in score.parts:
        tied: dict[int, list[float]] = {}
        for measure in part.getElementsByClass(stream.Measure):
            for n in measure.recurse().notes:
                start = float(measure.offset + n.getOffsetInHierarchy(measure))
                end = start + float(n.quarterLength)
                tie = n.tie.type if n.tie is not None else None
                for p in n.pitches:
                    if tie in ("continue", "stop") and p.midi in tied:
                        tied[p.midi][1] = end
                        if tie == "stop":
                            spans.append(tied.pop(p.midi))
                    elif tie == "start":
                        tied[p.midi] = [start, end, p.midi]
                    else:
                        spans.append([start, end, p.midi])
        spans.extend(tied.values())
    return [Note(int(p), s * sec, e * sec, CHORALE_VELOCITY) for s, e, p in spans if e > s]


def convert_chorales(store: Store | None = None, limit: int | None = None,
                     progress: Progress | None = None) -> Corpus:
    """The chorales as events, converted once (about 0.3 s per file) and then read from the store.

    `CHORALE_TEST_FRACTION` of the pieces (seeded) are held out as the test split, decided here on every load
    (`chorale_splits`), not in the cached conversion; `limit` converts only the first files."""
    store = store or Store()
    paths = chorale_paths(limit)
    key = _chorales_key(paths)

    def compute() -> tuple[dict[str, torch.Tensor], dict]:
        t0 = time.perf_counter()
        pieces, names, skipped = [], [], []
        for k, path in enumerate(paths):
            try:
                pieces.append(encode_notes(chorale_notes(path)))
                names.append(f"{path.parent.name}/{path.name}")
            except Exception as exc:  # noqa: BLE001 - an unreadable score is skipped and counted
                skipped.append(f"{path.name}: {exc}")
            report(progress, k + 1, len(paths), "convert Bach chorales")
        _warn_skipped("chorales", skipped, len(paths))
        return _save_corpus(pieces, names, list(chorale_splits(len(pieces))),
                            {"source": "music21 corpus", "skipped": skipped, "convert_s": time.perf_counter() - t0})

    art, _ = store.get_or_create(CORPUS_KIND, key, compute)
    corpus = _corpus(art.tensors, art.meta)
    return dataclasses.replace(corpus, splits=chorale_splits(len(corpus.names)))


def chorale_splits(n_pieces: int, fraction: float = CHORALE_TEST_FRACTION) -> tuple[str, ...]:
    """'train' or 'test' per piece: a seeded random `fraction` of the pieces (at least one) is held out whole,
    so no test window shares a piece with a training window."""
    n_test = max(1, round(fraction * n_pieces)) if n_pieces > 1 else 0
    test = set(np.random.default_rng(SPLIT_SEED).permutation(n_pieces)[:n_test].tolist())
    return tuple("test" if i in test else "train" for i in range(n_pieces))


def _chorales_key(paths: list[Path]) -> str:
    from music21 import __version__ as music21_version

    return spec_key({"corpus": "chorales", "music21": music21_version, "codec": CODEC_VERSION,
                     "files": [p.name for p in paths], "split_seed": SPLIT_SEED, "bpm": DEFAULT_BPM})


def _locate_chorales(root: Path) -> SourceStatus:
    store = Store()
    if store.has(CORPUS_KIND, _chorales_key(chorale_paths())):
        return SourceStatus("embedded", f"music21's bundled Bach chorales, converted and cached in {store.root}")
    return SourceStatus("to convert", "music21's bundled Bach chorales; converted to events on first use "
                                      "(about 2 minutes), then cached in the store")


# --- MAESTRO ----------------------------------------------------------------------------------------
def maestro_csv(root: Path) -> Path | None:
    """The newest MAESTRO metadata CSV under `root` (maestro-v*/maestro-v*.csv), if any."""
    found = sorted(root.glob("maestro*/maestro-v*.csv"))
    return found[-1] if found else None


def _locate_maestro(root: Path) -> SourceStatus:
    csv = maestro_csv(root)
    if csv is not None:
        return SourceStatus("found", str(csv.parent))
    return SourceStatus("missing", f"no maestro-v*/maestro-v*.csv in {root}")


def convert_maestro(csv: Path, store: Store | None = None, progress: Progress | None = None) -> Corpus:
    """The train and test files listed in a MAESTRO CSV as events (sustain pedal applied), converted once.

    Unreadable or missing MIDI files are skipped and counted in one warning."""
    store = store or Store()
    try:
        table = pd.read_csv(csv)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise UserError(f"{csv} is not a readable MAESTRO CSV ({type(exc).__name__}); {MAESTRO_HELP}") from None
    missing_cols = {"split", "midi_filename"} - set(table.columns)
    if missing_cols:
        raise UserError(f"{csv} is not a MAESTRO CSV: it lacks the column(s) {', '.join(sorted(missing_cols))}")
    table = table[table["split"].isin(["train", "test"])].sort_values("midi_filename", key=lambda c: c.astype(str))
    files = [(str(name), split) for name, split in zip(table["midi_filename"], table["split"])]
    sizes = [path.stat().st_size if (path := _inside(csv.parent, name)) and path.is_file() else -1
             for name, _ in files]
    key = spec_key({"corpus": "maestro", "csv": hashlib.sha256(csv.read_bytes()).hexdigest(),
                    "sizes": sizes, "codec": CODEC_VERSION})

    def compute() -> tuple[dict[str, torch.Tensor], dict]:
        t0 = time.perf_counter()
        pieces, names, splits, skipped = [], [], [], []
        for k, (name, split) in enumerate(files):
            try:
                path = _inside(csv.parent, name)
                if path is None:
                    raise MidiError(f"its path leads outside {csv.parent}")
                pieces.append(load_midi_tokens(path))
                names.append(name)
                splits.append(split)
            except Exception as exc:  # noqa: BLE001 - corrupt MIDI is skipped and counted, never fatal
                skipped.append(f"{name}: {type(exc).__name__}: {exc}")
            report(progress, k + 1, len(files), "convert MAESTRO MIDI")
        _warn_skipped("maestro", skipped, len(files))
        return _save_corpus(pieces, names, splits, {"source": str(csv), "skipped": skipped,
                                                    "convert_s": time.perf_counter() - t0})

    art, loaded = store.get_or_create(CORPUS_KIND, key, compute)
    if loaded:
        _warn_skipped("maestro", art.meta["skipped"], len(files))
    return _corpus(art.tensors, art.meta)


def _inside(folder: Path, name: str) -> Path | None:
    """`folder / name` when it stays inside `folder` (no '..' or absolute path out of it), else None."""
    path = (folder / name).resolve()
    return path if path.is_relative_to(folder.resolve()) else None


def _warn_skipped(name: str, skipped: list[str], total: int) -> None:
    if skipped:
        log.warning("%s: skipped %d of %d files that could not be read (first: %s)",
                    name, len(skipped), total, skipped[0])


# --- windows -> Dataset -----------------------------------------------------------------------------
_TABLES: dict[tuple[str, str], pd.DataFrame] = {}


def corpus_windows(corpus: Corpus, length: int = WINDOW) -> pd.DataFrame:
    """Every window of every piece: source_index (running number), file, split, window, token_offset."""
    rows = []
    for i, (name, split) in enumerate(zip(corpus.names, corpus.splits)):
        starts = window_starts(len(corpus.piece(i)), length)
        rows.append(pd.DataFrame({"piece": i, "file": name, "split": split, "window": np.arange(len(starts)),
                                  "token_offset": starts}))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["piece", "file", "split", "window", "token_offset"])
    table.insert(0, "source_index", np.arange(len(table)))
    return table


def music_dataset(name: str, corpus: Corpus, source: str, sizes: tuple[int | None, int | None] = (None, None),
                  length: int = WINDOW, seed: int = SPLIT_SEED) -> tuple[Dataset, pd.DataFrame]:
    """Windows of a corpus as a Dataset (sampled to `sizes`, None = all) and the table of all its windows."""
    table = corpus_windows(corpus, length)
    parts = []
    for split, wanted in zip(("train", "test"), sizes):
        rows = table[table["split"] == split]
        if wanted is not None:
            rows = rows.iloc[sample_indices(len(rows), wanted, seed)]
        pairs = [cut_window(corpus.piece(p), o, length) for p, o in zip(rows["piece"], rows["token_offset"])]
        x = np.stack([a for a, _ in pairs]) if pairs else np.zeros((0, length), dtype=np.int64)
        y = np.stack([b for _, b in pairs]) if pairs else np.zeros((0, length), dtype=np.int64)
        index = torch.from_numpy(rows["source_index"].to_numpy().copy())
        parts.append((torch.from_numpy(x), torch.from_numpy(y), index))
    (xtr, ytr, itr), (xte, yte, ite) = parts
    if len(xtr) == 0 or len(xte) == 0:
        raise UserError(f"{name}: no {'training' if len(xtr) == 0 else 'test'} windows of {length} tokens in {source}")
    return Dataset(name, "music", xtr, ytr, xte, yte, itr, ite, (), source), table


def window_table(name: str, data_root: str | Path | None = None) -> pd.DataFrame:
    """For a loaded music dataset, the table mapping each source index to file, window and token offset."""
    dataset = load_dataset(name, data_root)
    key = (name, dataset.source)
    if key not in _TABLES:
        raise UserError(f"dataset {name!r} has no window table (is it a music dataset?)")
    return _TABLES[key]


def window_source(name: str, source_index: int, data_root: str | Path | None = None) -> dict:
    """File, split, window number and token offset of one window, by its source index."""
    row = window_table(name, data_root).iloc[int(source_index)]
    return {"source_index": int(source_index), "file": row["file"], "split": row["split"],
            "window": int(row["window"]), "token_offset": int(row["token_offset"])}


def _load_chorales(root: Path, download: bool) -> Dataset:
    corpus = convert_chorales(progress=tqdm_progress())
    source = (f"music21's bundled Bach chorales: {len(corpus.names)} pieces, {len(corpus.tokens)} event tokens, "
              f"{CHORALE_TEST_FRACTION:.0%} of the pieces held out for test (seed {SPLIT_SEED}); windows of {WINDOW}; "
              f"source index = "
              f"running window number (see window_table('chorales'))")
    dataset, table = music_dataset("chorales", corpus, source)
    _TABLES[("chorales", source)] = table
    return dataset


def _load_maestro(root: Path, download: bool) -> Dataset:
    csv = maestro_csv(root)
    if csv is None:
        raise UserError(f"MAESTRO not found: looked for maestro-v*/maestro-v*.csv in {root}. It is never "
                        f"downloaded automatically: {MAESTRO_HELP}")
    corpus = convert_maestro(csv, progress=tqdm_progress())
    source = (f"MAESTRO from {csv.parent}: {len(corpus.names)} readable train/test files; "
              f"{MAESTRO_SIZES[0]} train / {MAESTRO_SIZES[1]} test windows of {WINDOW} sampled with seed "
              f"{SPLIT_SEED} (the CSV's split column decides train/test); source index = running window number "
              f"(see window_table('maestro'))")
    dataset, table = music_dataset("maestro", corpus, source, MAESTRO_SIZES)
    _TABLES[("maestro", source)] = table
    return dataset


register(DatasetInfo("chorales", "music", "Bach chorales from music21 as performance events, windows of 256, 30% "
                     "of the pieces held out (offline default)", _load_chorales, _locate_chorales))
register(DatasetInfo("maestro", "music", "MAESTRO v2/v3 piano MIDI as performance events, 5000/178 windows of 256 "
                     "(user-provided)", _load_maestro, _locate_maestro))


def unigram_loss(dataset: Dataset) -> float:
    """Test cross-entropy (nats per token) of the training set's token frequencies (add-one smoothed):
    the baseline a sequence model must beat."""
    valid_train = dataset.y_train[dataset.y_train >= 0]
    counts = torch.bincount(valid_train, minlength=VOCAB_SIZE).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[dataset.y_test[dataset.y_test >= 0]].mean())
