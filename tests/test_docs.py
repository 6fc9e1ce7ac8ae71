"""Every figure in the README's results tables comes from a committed CSV.

A results table in the README is preceded by a marker naming its source, `<!-- source: docs/FILE.csv -->`; each
of its rows is found in that CSV by its `setting` (and `versus`, for paired tables), and each number in the row
must equal the CSV's value rounded as shown. The files the markers name must also say which command made them.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tda_core.report import HEADERS, with_space_mb

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- source: (?P<csv>\S+\.csv) -->\s*\n(?P<table>(?:\|.*\|\s*\n)+)")
COLUMN_OF = {header: column for column, header in HEADERS.items()}


def readme_tables() -> list[tuple[str, pd.DataFrame]]:
    """(source CSV, table as strings) for every marked table of the README."""
    out = []
    for match in MARKER.finditer((ROOT / "README.md").read_text()):
        lines = [line.strip().strip("|").split("|") for line in match["table"].strip().splitlines()]
        header, rows = [c.strip() for c in lines[0]], [[c.strip() for c in row] for row in lines[2:]]
        out.append((match["csv"], pd.DataFrame(rows, columns=header)))
    return out


def test_the_readme_has_sourced_results_tables():
    tables = readme_tables()
    assert len(tables) >= 2, "the README's results tables lost their <!-- source: ... --> markers"
    for csv, _ in tables:
        assert (ROOT / csv).exists(), f"{csv} is not committed"


@pytest.mark.parametrize("csv, table", readme_tables(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_figure_in_a_readme_table_is_in_its_csv(csv, table):
    source = pd.read_csv(ROOT / csv)
    if "space_bytes" in source:
        source = with_space_mb(source)
    keys = [c for c in ("setting", "versus") if c in table]
    assert keys == ["setting"] + (["versus"] if "versus" in source else []), f"{csv}: rows need a setting column"
    checked = 0
    for _, row in table.iterrows():
        match = source
        for key in keys:
            match = match[match[key] == row[key]]
        assert len(match) == 1, f"{csv}: no single row for {dict(row[keys])}"
        for header, text in row.items():
            column = COLUMN_OF.get(header, header)
            if header in keys or not text or column not in source:
                continue
            value = match[column].iloc[0]
            if isinstance(value, str):
                assert text == value, f"{csv} {dict(row[keys])} {header}: README {text}, CSV {value}"
                continue
            digits = len(text.split(".")[1]) if "." in text else 0
            assert text == f"{float(value):.{digits}f}" or (np.isnan(value) and text in ("", "nan")), \
                f"{csv} {dict(row[keys])} {header}: README {text}, CSV {value}"
            checked += 1
    assert checked >= len(table)  # at least one number per row was compared
