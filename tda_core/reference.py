"""Reference results: measured results committed under docs/, listed with where, when and by which command they
were measured in one manifest (docs/reference_results.json), read as rows of the results table.

The app's LDS-vs-cost page draws them as reference series beside the user's own results, so a first visitor
sees the research's plot before computing anything. Files written by older code lack some columns (replicate
spread, ground-truth ceiling, setting key): those read as missing, never as an error.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .comparison import PairedComparison
from .errors import UserError
from .experiments import compare_stored
from .results import OWN_SOURCE as OWN
from .results import SOURCE_COLUMN as SOURCE
from .results import with_labels
from .store import Store

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "docs" / "reference_results.json"
REQUIRED = ("task", "method", "proj", "ensemble", "I", "lds")
OPTIONAL = ("proj_dim", "D", "L", "P", "shared_projection", "lds_sem", "lds_rep_se", "replicates", "damping",
            "n_eval", "train_s", "serve_s", "space_bytes", "n_trained", "n_members", "device", "M", "alpha", "runs",
            "reliability", "ceiling", "setting_key")
BUDGET_DEFAULTS = {"D": 1, "L": 1, "P": 1, "shared_projection": False}


@dataclasses.dataclass(frozen=True)
class ReferenceFile:
    """One committed results file and how it was made."""

    path: str  # relative to the repository root
    task: str
    label: str
    where: str
    when: str
    command: str
    note: str = ""

    @property
    def source(self) -> str:
        """The name its rows carry in the `source` column (and the figure's legend)."""
        return f"reference: {self.label} ({self.when})"

    def describe(self) -> str:
        """One Markdown line: what, where, when, how."""
        note = f" — {self.note}" if self.note else ""
        return f"**{self.label}** · {self.where} · {self.when} · `{self.command}`{note}"


@dataclasses.dataclass
class ReferenceResults:
    """Rows of the chosen reference files (with `source`), and a sentence per file that could not be read."""

    frame: pd.DataFrame
    problems: list[str]


def reference_files(task: str | None = None, manifest: Path = MANIFEST) -> list[ReferenceFile]:
    """The manifest's files (of one task when given), in manifest order: per task, the first is the default."""
    try:
        entries = json.loads(Path(manifest).read_text())["files"]
        files = [ReferenceFile(**entry) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the reference manifest {manifest}: {exc}") from None
    return [f for f in files if task is None or f.task == task]


def read_reference(file: ReferenceFile, root: Path = ROOT) -> pd.DataFrame:
    """One file's rows with every known column (missing optional ones as NaN), `source` and the row labels."""
    path = root / file.path
    if not path.exists():
        raise UserError(f"{file.path} is listed in the reference manifest but missing")
    frame = pd.read_csv(path)
    missing = [c for c in REQUIRED if c not in frame]
    if missing:
        raise UserError(f"{file.path} lacks the column(s) {', '.join(missing)}; it cannot be drawn")
    for column in OPTIONAL:
        if column not in frame:
            frame[column] = BUDGET_DEFAULTS.get(column, np.nan)
    frame = frame[frame["task"] == file.task]
    if frame.empty:
        raise UserError(f"{file.path} holds no rows of task {file.task}, the task the manifest lists it under")
    return with_labels(frame.assign(**{SOURCE: file.source})).reset_index(drop=True)


def load_references(files: list[ReferenceFile], root: Path = ROOT) -> ReferenceResults:
    """The rows of several reference files; a file that cannot be read becomes a problem sentence, not an error."""
    frames, problems = [], []
    for file in files:
        try:
            frames.append(read_reference(file, root))
        except (UserError, OSError, ValueError) as exc:
            problems.append(str(exc))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return ReferenceResults(frame, problems)


def with_source(own: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """The user's rows (source `OWN`) and reference rows in one frame, each with a stable `row_id`."""
    parts = [f for f in (own.assign(**{SOURCE: OWN}) if not own.empty else own, references) if not f.empty]
    if not parts:
        return pd.DataFrame()
    frame = pd.concat(parts, ignore_index=True)
    return frame.assign(row_id=np.arange(len(frame)))


def is_reference(row: pd.Series | dict) -> bool:
    """True for a row read from a reference file."""
    return str(row.get(SOURCE, OWN)) != OWN


def compare_rows(store: Store, row_a: pd.Series | dict, row_b: pd.Series | dict) -> PairedComparison:
    """The paired LDS comparison of two rows of the results table (own rows, from their stored per-example LDS);
    a reference row carries no per-example LDS, which the error says along with what to do instead."""
    if is_reference(row_a) or is_reference(row_b):
        raise UserError("reference rows carry no per-example LDS, so they cannot be compared pairwise; run the "
                        "setting in this store (click its point, then Build & attribute) and compare your own rows")
    keys = [row.get("setting_key") for row in (row_a, row_b)]
    if any(not isinstance(k, str) or not k for k in keys):
        raise UserError("a row without a setting key cannot be compared; run the setting again to record one")
    return compare_stored(store, keys[0], keys[1])
