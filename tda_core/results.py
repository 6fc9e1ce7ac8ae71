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
SOURCE_COLUMN = "source"  # where a row comes from: this store, or a reference file (tda_core/reference.py)
OWN_SOURCE = "this store"


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
    """Append result rows to the store's results table; a setting already there is not added twice (two app
    sessions recording one result)."""
    store.append_rows(RESULTS_TABLE, rows, unique_by="setting_key")


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


def _finite(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").where(lambda v: np.isfinite(v))


def _hover(part: pd.DataFrame, x: str) -> tuple[np.ndarray, str]:
    """customdata (setting, row id, source, replicate spread text, ceiling text) and the hover template."""
    rep = _finite(part.get("lds_rep_se", pd.Series(np.nan, index=part.index)))
    reps = part.get("replicates", pd.Series(np.nan, index=part.index))
    ceiling = _finite(part.get("ceiling", pd.Series(np.nan, index=part.index)))
    rep_text = [f"<br>± {r:.3f} across {int(n)} seed replicates" if pd.notna(r) else "" for r, n in zip(rep, reps)]
    ceil_text = [f"<br>ground-truth ceiling {c:.3f}" if pd.notna(c) else "" for c in ceiling]
    row_id = part["row_id"] if "row_id" in part else pd.Series(part.index, index=part.index)
    data = np.column_stack([part["setting"], row_id, part[SOURCE_COLUMN], rep_text, ceil_text])
    template = ("%{customdata[0]}<br>LDS %{y:.3f} ± %{error_y.array:.3f} (test examples)%{customdata[3]}"
                "%{customdata[4]}<br>" + COST_LABELS[x] + " %{x:.3g}<br><i>%{customdata[2]}</i><extra></extra>")
    return data, template


def lds_cost_figure(frame: pd.DataFrame, x: str = "train_s", log_x: bool = True):  # noqa: ANN201 - plotly Figure
    """LDS against a cost column: one panel per (method, projection), one line per ensemble series through its
    settings in cost order, labelled by budget; error bars are the standard error over test examples (thin, with
    caps) and, where a row has seed replicates, across replicates (thick); the projection-seed control is dashed,
    each source's Pareto frontier dotted and the ground truth's ceiling (the best LDS its noise allows) a
    dash-dot line. Rows whose `source` is not `OWN_SOURCE` (reference results) are drawn with open, faded markers.
    Every point's customdata holds (setting, row id, source): what a click on it selects."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if x not in COST_LABELS:
        raise unknown_choice("x axis", x, list(COST_LABELS))
    df = with_labels(frame)
    if SOURCE_COLUMN not in df:
        df[SOURCE_COLUMN] = OWN_SOURCE
    methods, projs = sorted(df["method"].unique()), sorted(df["proj"].astype(str).unique())
    fig = make_subplots(rows=len(methods), cols=len(projs), shared_yaxes=True,
                        subplot_titles=[f"{m} · {p} projection" for m in methods for p in projs],
                        vertical_spacing=0.16 if len(methods) > 1 else 0.1, horizontal_spacing=0.06)
    shown: set[str] = set()
    sources = sorted(df[SOURCE_COLUMN].unique(), key=lambda s: (s != OWN_SOURCE, s))
    for r, method in enumerate(methods, 1):
        for c, proj in enumerate(projs, 1):
            panel = df[(df["method"] == method) & (df["proj"].astype(str) == proj)]
            for source in sources:
                own = source == OWN_SOURCE
                part_source = panel[panel[SOURCE_COLUMN] == source]
                group = "own" if own else source
                for series, part in part_source.groupby("series", sort=False):
                    part = part.sort_values(x)
                    color = SERIES_COLORS.get(series, "#333")
                    data, template = _hover(part, x)
                    legend_key = f"{group}/{series}"
                    fig.add_trace(go.Scatter(
                        x=part[x], y=part["lds"],
                        error_y=dict(array=_finite(part.get("lds_sem", part["lds"] * np.nan)), width=2, thickness=1),
                        mode="lines+markers+text", text=part["budget"], textposition="middle right",
                        textfont=dict(size=10, color="#555" if own else "#aaa"), name=series,
                        legendgroup=group, legendgrouptitle_text=(("your results" if own else source)
                                                                  if sources != [OWN_SOURCE] else None),
                        showlegend=legend_key not in shown, customdata=data, hovertemplate=template,
                        opacity=1.0 if own else 0.55,
                        marker=dict(size=9 if own else 8, symbol="circle" if own else "circle-open",
                                    line=dict(width=1 if own else 2, color="white" if own else color), color=color),
                        line=dict(color=color, width=1.5 if own else 1,
                                  dash="dash" if series == CONTROL_SERIES else "solid")), row=r, col=c)
                    shown.add(legend_key)
                    rep = _finite(part.get("lds_rep_se", part["lds"] * np.nan))
                    if rep.notna().any():
                        fig.add_trace(go.Scatter(x=part[x], y=part["lds"], mode="markers", showlegend=False,
                                                 marker=dict(size=1, color=color), hoverinfo="skip",
                                                 legendgroup=group, opacity=1.0 if own else 0.55,
                                                 error_y=dict(array=rep, width=0, thickness=4, color=color)),
                                      row=r, col=c)
                if part_source.empty:
                    continue
                front = pareto(part_source, x)
                name = "Pareto frontier" if own else "Pareto frontier (reference)"
                fig.add_trace(go.Scatter(x=front[x], y=front["lds"], mode="lines", name=name,
                                         line=dict(color="#222" if own else "#aaa", dash="dot", shape="hv", width=1.2),
                                         legendgroup=group, showlegend=f"{group}/pareto" not in shown,
                                         hoverinfo="skip"), row=r, col=c)
                shown.add(f"{group}/pareto")
                ceiling = _finite(part_source.get("ceiling", part_source["lds"] * np.nan)).median()
                if pd.notna(ceiling):
                    fig.add_hline(y=float(ceiling), row=r, col=c, line=dict(color="#888" if own else "#ccc",
                                                                            dash="dashdot", width=1),
                                  annotation_text=f"ground-truth ceiling {ceiling:.2f}" + ("" if own else " (ref.)"),
                                  annotation_font=dict(size=10, color="#777"), annotation_position="top left")
            fig.update_xaxes(title_text=COST_LABELS[x], type="log" if log_x else "linear", row=r, col=c)
        fig.update_yaxes(title_text="LDS (higher is better)", row=r, col=1)
    fig.update_layout(height=380 * len(methods) + 100, template="plotly_white", legend=dict(title=None),
                      margin=dict(l=10, r=10, t=60, b=10), clickmode="event+select",
                      title=f"LDS against {COST_LABELS[x]} ({', '.join(sorted(map(str, df['task'].unique())))})")
    return fig
