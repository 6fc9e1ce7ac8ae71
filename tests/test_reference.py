"""Reference results: the committed manifest, reading files of older and newer code, and drawing them apart."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tda_core.errors import UserError
from tda_core.reference import (MANIFEST, OPTIONAL, REQUIRED, ROOT, SOURCE, compare_rows, load_references,
                                read_reference, reference_files, with_source)
from tda_core.results import OWN_SOURCE, lds_cost_figure
from tda_core.settings import make_setting, setting_values, values_from_row


def test_the_manifest_lists_readable_files_with_where_when_and_how():
    files = reference_files()
    assert {f.task for f in files} >= {"mnist-mlp", "chorales-mt", "digits-mlp"}
    assert len({(f.task, f.path) for f in files}) == len({(f.task, f.source) for f in files}) == len(files)
    loaded = load_references(files)
    assert loaded.problems == []
    for file in files:
        rows = loaded.frame[(loaded.frame[SOURCE] == file.source) & (loaded.frame["task"] == file.task)]
        raw = pd.read_csv(ROOT / file.path)
        assert len(rows) == (raw["task"] == file.task).sum() > 0
        assert file.when and file.where and file.command.startswith("python -m tda_core ")
        np.testing.assert_allclose(rows["lds"].to_numpy(), raw.loc[raw["task"] == file.task, "lds"].to_numpy())
    assert reference_files("mnist-mlp")[0].path == "docs/results_mnist_cpu_readme.csv"  # the default: current code


def test_files_of_older_code_read_with_missing_columns(tmp_path):
    old = pd.read_csv(ROOT / "docs/results_mnist_cpu_kron.csv")[list(REQUIRED) + ["train_s"]].head(5)
    (tmp_path / "docs").mkdir()
    old.to_csv(tmp_path / "docs/old.csv", index=False)
    pd.DataFrame({"task": ["mnist-mlp"], "lds": [0.3]}).to_csv(tmp_path / "docs/broken.csv", index=False)
    manifest = tmp_path / "manifest.json"
    entry = {"task": "mnist-mlp", "label": "x", "where": "here", "when": "2026-01-01",
             "command": "python -m tda_core x"}
    manifest.write_text(json.dumps({"files": [entry | {"path": "docs/old.csv"}, entry | {"path": "docs/broken.csv"},
                                              entry | {"path": "docs/gone.csv"}]}))
    loaded = load_references(reference_files(manifest=manifest), root=tmp_path)
    assert len(loaded.frame) == 5 and set(OPTIONAL) <= set(loaded.frame.columns)
    assert loaded.frame["lds_rep_se"].isna().all() and (loaded.frame["D"] >= 1).all()
    assert len(loaded.problems) == 2
    assert "lacks the column(s) method, proj, ensemble, I" in loaded.problems[0]
    assert "docs/gone.csv is listed in the reference manifest but missing" in loaded.problems[1]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UserError, match="cannot read the reference manifest"):
        reference_files(manifest=bad)


def test_reference_rows_are_drawn_apart_and_carry_their_row_ids():
    reference = read_reference(reference_files("digits-mlp")[0])
    own = reference.head(3).drop(columns=[SOURCE]).assign(lds_rep_se=0.01, replicates=3, ceiling=0.6)
    frame = with_source(own, reference)
    assert list(frame["row_id"]) == list(range(len(frame)))
    figure = lds_cost_figure(frame, "n_trained", log_x=False)
    points = [t for t in figure.data if t.mode and "markers" in t.mode and t.customdata is not None]
    own_traces = [t for t in points if t.customdata[0][2] == OWN_SOURCE]
    ref_traces = [t for t in points if t.customdata[0][2] != OWN_SOURCE]
    assert own_traces and ref_traces
    assert {t.marker.symbol for t in own_traces} == {"circle"} and {t.marker.symbol for t in ref_traces} == {
        "circle-open"}
    assert all(t.opacity < 1 for t in ref_traces)
    ids = sorted(int(row[1]) for t in points for row in t.customdata)
    assert ids == list(range(len(frame)))  # every row is one clickable point
    thick = [t for t in figure.data if t.error_y and t.error_y.thickness == 4]  # replicate spread of own rows
    assert thick and np.allclose(np.asarray(thick[0].error_y.array, dtype=float), 0.01)
    ceilings = [s for s in figure.layout.shapes if s.y0 == s.y1]
    assert any(abs(s.y0 - 0.6) < 1e-9 for s in ceilings)


def test_a_plotted_row_opens_its_own_setting():
    for file in reference_files():
        for row in read_reference(file).to_dict("records"):
            setting = make_setting(values_from_row(row))
            assert (setting.task.name, setting.method.name, setting.method.proj) == (row["task"], row["method"],
                                                                                    row["proj"])
            e = setting.ensemble
            assert (e.kind, e.I, e.n_members) == (row["ensemble"], row["I"], row["n_members"])
            assert e.shared_projection == bool(row["shared_projection"])
            if row["method"] == "trak":
                assert setting.method.damping == row["damping"]
            assert setting_values(setting)["I"] == row["I"]


def test_reference_rows_cannot_be_compared_pairwise(store):
    reference = read_reference(reference_files("digits-mlp")[0])
    own = reference.iloc[0].to_dict() | {SOURCE: OWN_SOURCE, "setting_key": "0" * 24}
    with pytest.raises(UserError, match="reference rows carry no per-example LDS"):
        compare_rows(store, own, reference.iloc[1])
    with pytest.raises(UserError, match="no per-example LDS stored"):
        compare_rows(store, own, own)
    assert MANIFEST.exists()
