"""The results table (one row per evaluated setting), its Pareto frontier and its LDS-vs-cost figure.

`run` and `sweep` (experiments.py) append rows; the CLI's `results` / `sweep --plot` and the app's LDS-vs-cost
page read them through `results_frame` and draw them with `lds_cost_figure`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import unknown_choice
from .specs import ensemble_kind
from .store import Store

RESULTS_TABLE = "results"
COST_COLUMNS = ("train_s", "serve_s", "space_bytes", "n_trained", "n_members")
COST_LABELS = {"train_s": "training seconds", "serve_s": "serving seconds", "space_bytes": "space (bytes)",
               "n_trained": "independently trained models", "n_members": "members"}
SETTING_COLUMNS = ("task", "method", "proj", "proj_dim", "ensemble", "I", "D", "L", "P", "shared_projection",
                   "damping")
SERIES_COLORS = {"naive": "#4C78A8", "dropout": "#E45756", "dropout (shared proj.)": "#FF9DA6",
                 "dropout-forward": "#F58518", "lora": "#54A24B", "lora (shared proj.)": "#88D27A",
                 "proj-seeds": "#9D9D9D"}
CONTROL_SERIES = "proj-seeds"  # drawn dashed: what averaging projection seeds alone buys


def series_label(row: pd.Series | dict[str, Any]) -> str:
    """The series a row belongs to: ensemble kind, marked when its members share a projection."""
    shared = str(row.get("shared_projection")).lower() == "true"
    if shared and "shared_projection" in ensemble_kind(row["ensemble"]).fields:
        return f"{row['ensemble']} (shared proj.)"
    return str(row["ensemble"])


def budget_label(row: pd.Series | dict[str, Any]) -> str:
    """'I2 D5' and the like: the ensemble's size in a few characters."""
    budget = ensemble_kind(row["ensemble"]).budget
    return f"I{row['I']}" + (f" {budget}{row[budget]}" if budget else "")


def setting_label(row: pd.Series | dict[str, Any]) -> str:
    """'trak (kron) · dropout I2 D5' and the like."""
    return f"{row['method']} ({row['proj']}) · {series_label(row)} {budget_label(row)}"


def append_results(store: Store, rows: list[dict[str, Any]]) -> None:
    """Append result rows to the store's results table."""
    store.append_rows(RESULTS_TABLE, rows)


def results_frame(store: Store) -> pd.DataFrame:
    """The store's results table (last row per setting) with its `series`, `budget` and readable `setting`."""
    frame = store.read_table(RESULTS_TABLE)
    if frame.empty:
        return frame
    if "setting_key" in frame:
        frame = frame.drop_duplicates("setting_key", keep="last")
    return with_labels(frame).reset_index(drop=True)


def with_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with the `series`, `budget` and `setting` columns of each row."""
    return frame.assign(series=frame.apply(series_label, axis=1), budget=frame.apply(budget_label, axis=1),
                        setting=frame.apply(setting_label, axis=1))


def results_for(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows of `frame` for the given setting keys, in that order (the last row of a key wins)."""
    if frame.empty:
        return frame
    last = frame.drop_duplicates("setting_key", keep="last").set_index("setting_key")
    present = [k for k in keys if k in last.index]
    return last.loc[present].reset_index()[list(frame.columns)]


def is_recorded(setting_key: str, store: Store) -> bool:
    """True when the setting already has a row in the results table."""
    table = store.read_table(RESULTS_TABLE)
    return "setting_key" in table and setting_key in set(table["setting_key"])


def filter_results(frame: pd.DataFrame, methods: list[str] | None = None, projections: list[str] | None = None,
                   series: list[str] | None = None) -> pd.DataFrame:
    """Rows whose method, projection and series are among the chosen ones (empty choice = all)."""
    keep = pd.Series(True, index=frame.index)
    for column, chosen in (("method", methods), ("proj", projections), ("series", series)):
        if chosen:
            keep &= frame[column].astype(str).isin(chosen)
    return frame[keep]


def pareto(df: pd.DataFrame, cost_col: str, score_col: str = "lds") -> pd.DataFrame:
    """Rows not dominated in (lower `cost_col`, higher `score_col`), sorted by cost.

    A row is dominated when another costs no more and scores at least as high, one of them strictly.
    """
    if cost_col not in df.columns:
        raise unknown_choice("cost column", cost_col, [c for c in df.columns if c in COST_COLUMNS] or COST_COLUMNS)
    ordered = df.dropna(subset=[cost_col, score_col]).sort_values([cost_col, score_col], ascending=[True, False])
    keep, best = [], -np.inf
    for idx, score in zip(ordered.index, ordered[score_col]):
        if score > best:
            keep.append(idx)
            best = score
    return ordered.loc[keep]


def lds_cost_figure(frame: pd.DataFrame, x: str = "train_s", log_x: bool = True):  # noqa: ANN201 - plotly Figure
    """LDS (with its standard error) against a cost column: one panel per (method, projection), one line per
    ensemble series through its settings in cost order, labelled by budget, the projection-seed control dashed
    and each panel's Pareto frontier dotted."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if x not in COST_LABELS:
        raise unknown_choice("x axis", x, list(COST_LABELS))
    df = with_labels(frame)
    methods, projs = sorted(df["method"].unique()), sorted(df["proj"].astype(str).unique())
    fig = make_subplots(rows=len(methods), cols=len(projs), shared_yaxes=True,
                        subplot_titles=[f"{m} · {p} projection" for m in methods for p in projs],
                        vertical_spacing=0.16 if len(methods) > 1 else 0.1, horizontal_spacing=0.06)
    shown: set[str] = set()
    for r, method in enumerate(methods, 1):
        for c, proj in enumerate(projs, 1):
            panel = df[(df["method"] == method) & (df["proj"].astype(str) == proj)]
            for series, part in panel.groupby("series", sort=False):
                part = part.sort_values(x)
                fig.add_trace(go.Scatter(
                    x=part[x], y=part["lds"], error_y=dict(array=part["lds_sem"], width=2, thickness=1),
                    mode="lines+markers+text", text=part["budget"], textposition="middle right",
                    textfont=dict(size=10, color="#555"), name=series, legendgroup=series,
                    showlegend=series not in shown, customdata=part[["setting"]],
                    hovertemplate="%{customdata[0]}<br>LDS %{y:.3f}<br>" + COST_LABELS[x] + " %{x:.3g}"
                                  "<extra></extra>",
                    marker=dict(size=9, line=dict(width=1, color="white")),
                    line=dict(color=SERIES_COLORS.get(series, "#333"), width=1.5,
                              dash="dash" if series == CONTROL_SERIES else "solid")), row=r, col=c)
                shown.add(series)
            front = pareto(panel, x)
            fig.add_trace(go.Scatter(x=front[x], y=front["lds"], mode="lines", name="Pareto frontier",
                                     line=dict(color="#222", dash="dot", shape="hv", width=1.2),
                                     legendgroup="pareto", showlegend="pareto" not in shown, hoverinfo="skip"),
                          row=r, col=c)
            shown.add("pareto")
            fig.update_xaxes(title_text=COST_LABELS[x], type="log" if log_x else "linear", row=r, col=c)
        fig.update_yaxes(title_text="LDS (higher is better)", row=r, col=1)
    fig.update_layout(height=380 * len(methods) + 100, template="plotly_white", legend=dict(title=None),
                      margin=dict(l=10, r=10, t=60, b=10),
                      title=f"LDS against {COST_LABELS[x]} ({', '.join(sorted(map(str, df['task'].unique())))})")
    return fig
