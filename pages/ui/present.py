"""Presentation helpers: labels, captions, readable sizes, thumbnails and small tables for people.

No computation lives here: everything shown is computed by tda_core; these only format it.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from PIL import Image

from tda_core.costs import Costs
from tda_core.data import Dataset
from tda_core.ensembles import ENSEMBLES
from tda_core.evaluation import Counterfactual
from tda_core.methods import METHODS
from tda_core.projections import PROJECTIONS
from tda_core.store import Store


def method_label(name: str) -> str:
    return METHODS.get(name).label


def kind_label(name: str) -> str:
    return ENSEMBLES.get(name).label


def projection_label(name: str) -> str:
    return PROJECTIONS.get(name).label


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def store_overview(store: Store) -> pd.DataFrame:
    """What the store holds: artifacts per kind with their total size, readable."""
    summary = store.summary()
    if summary.empty:
        return summary
    summary = summary.copy()
    summary["size"] = summary["bytes"].map(human_bytes)
    return summary[["kind", "artifacts", "size"]]


def caption(row: pd.Series | dict, compact: bool = False) -> str:
    """A caption for a top-k row: label, source index and score (compact: label and score)."""
    if compact:
        return f"{row['label']} · {row['score']:+.2g}"
    return f"{row['label']} · #{row['source_index']} · {row['score']:+.3g}"


def describe_example(dataset: Dataset, split: str, position: int) -> str:
    """'7 · #1234' (label · source index) for one example of a split."""
    _, y, index = dataset.split(split)
    label = dataset.class_names[int(y[position])] if y[position].dim() == 0 and dataset.class_names else "window"
    return f"{label} · #{int(index[position])}"


def example_label(table: pd.DataFrame, position: int) -> str:
    """A selector label for a row of `tda_core.examples.example_table`: position, label and the prediction."""
    row = table.set_index("position").loc[position]
    text = f"{position} · #{row['source_index']}"
    if "label" in row:
        text += f" · label {row['label']}"
    if "predicted" in row:
        text += f" · predicted {row['predicted']}" + ("" if row["correct"] else " ✗")
    return text


def thumbnail(image: np.ndarray, size: int = 84) -> np.ndarray:
    """Upscale a small uint8 image by pixel repetition (crisp, no blur) to about `size` pixels wide."""
    factor = max(1, size // image.shape[1])
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def thumbnails(dataset: Dataset, split: str, positions: list[int] | np.ndarray, size: int = 84) -> list[np.ndarray]:
    """Crisp thumbnails of several examples of one split."""
    return [thumbnail(dataset.image(split, int(p)), size) for p in positions]


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 image as a PNG data URI (for image columns of tables)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def breakdown_table(costs: Costs) -> pd.DataFrame:
    """The named seconds of a cost breakdown, largest first."""
    rows = [{"step": name.removesuffix("_s").replace("_", " "), "seconds": round(float(v), 3)}
            for name, v in costs.breakdown.items() if isinstance(v, (int, float))]
    return pd.DataFrame(rows, columns=["step", "seconds"]).sort_values("seconds", ascending=False)


def seconds_per_model(costs: Costs) -> float:
    """Seconds one base model took to train (as recorded when it was trained)."""
    return costs.breakdown.get("base_train_s", costs.train_s) / max(1, costs.n_trained)


def plan_summary(work) -> str:  # noqa: ANN001 - a tda_core.attribution.WorkPlan
    """One markdown line: models to train, members, features and memory."""
    return (f"**{len(work.models_to_train)}** model(s) to train ({len(work.models_stored)} stored) · "
            f"**{len(work.members)}** member(s) · {work.n_params:,} parameters → {work.feature_dim:,} features · "
            f"peak memory ~{human_bytes(work.peak_bytes)} of {human_bytes(work.budget_bytes)} · "
            f"feature cache ~{human_bytes(work.disk_bytes)}")


def counterfactual_view(result: Counterfactual) -> tuple[pd.DataFrame, str]:
    """(one row per removal with its target change, a summary sentence) of a counterfactual check."""
    k, n_random = result.k, len(result.random_changes)
    frame = pd.DataFrame({"removed": [f"top-{k} proponents"] + [f"{k} random examples"] * n_random,
                          "change": [result.top_change, *result.random_changes.tolist()]})
    summary = (f"Margin with the full training set: **{result.base:.2f}**. Without the top-{k} proponents: "
               f"**{result.top_change:+.2f}**; without {k} random examples: **{result.random_mean:+.2f}** on average "
               f"over {n_random} draws ({result.fraction_random_below:.0%} of random draws lowered "
               f"it as much). Averaged over training seeds {result.seeds}.")
    return frame, summary


def results_display(frame: pd.DataFrame) -> pd.DataFrame:
    """The results table for people: setting columns first, LDS with its spreads and the ground truth's ceiling,
    costs rounded, bytes readable, best LDS first (a `row_id` column is kept for selections)."""
    out = frame.drop(columns=["setting", "series", "budget", "setting_key"], errors="ignore")
    out = out.round({"lds": 3, "lds_sem": 3, "lds_rep_se": 3, "ceiling": 3, "reliability": 3, "lds_validation": 3,
                     "train_s": 2, "serve_s": 2})
    if "ceiling" in out:  # beside the LDS it bounds
        beside = "lds_sem" if "lds_sem" in out else "lds"
        ceiling = out.pop("ceiling")
        out.insert(out.columns.get_loc(beside) + 1, "ceiling", ceiling)
    if "space_bytes" in out:
        out.insert(out.columns.get_loc("space_bytes"), "space", out["space_bytes"].map(human_bytes))
        out = out.drop(columns=["space_bytes"])
    if "source" in out:  # own results or which reference file: first
        out.insert(0, "source", out.pop("source"))
    return out.sort_values("lds", ascending=False)


def difference_image(difference: np.ndarray, size: int = 84) -> np.ndarray:
    """A signed pixel difference in [-1, 1] as a crisp RGB thumbnail: red where the test example is brighter, blue
    where the training example is, white where they agree."""
    d = np.clip(np.asarray(difference, dtype=np.float64), -1.0, 1.0)
    rgb = np.stack([1.0 - np.clip(-d, 0.0, 1.0), 1.0 - np.abs(d), 1.0 - np.clip(d, 0.0, 1.0)], axis=-1)
    return thumbnail((255 * rgb).round().astype(np.uint8), size)


def rank_strip(ranks: pd.DataFrame, column_labels: list[str], n_train: int):  # noqa: ANN201 - plotly Figure
    """Members (rows) by the ensemble's top proponents (columns): each cell the member's own rank of that training
    example, dark = high in that member's list too (colour on a log scale up to the training-set size)."""
    import plotly.graph_objects as go

    values = ranks.to_numpy()
    fig = go.Figure(go.Heatmap(
        z=np.log10(values).tolist(), x=column_labels, y=list(ranks.index), text=values.tolist(), texttemplate="%{text}",
        colorscale="Blues_r", zmin=0.0, zmax=float(np.log10(max(n_train, 10))), showscale=False, xgap=2, ygap=2,
        hovertemplate="%{y}<br>ensemble's %{x}: this member ranks it %{text}<extra></extra>"))
    fig.update_layout(height=70 + 24 * len(values), margin=dict(l=10, r=10, t=10, b=40), template="plotly_white",
                      yaxis=dict(autorange="reversed", tickfont=dict(size=11)), xaxis=dict(tickfont=dict(size=11)))
    return fig


def comparison_metrics(cmp) -> list[tuple[str, str, str]]:  # noqa: ANN001 - a tda_core.comparison.PairedComparison
    """(label, value, help) triples of a paired LDS comparison for `st.metric`."""
    return [("LDS of A", f"{cmp.lds_a:.3f}", cmp.label_a), ("LDS of B", f"{cmp.lds_b:.3f}", cmp.label_b),
            ("A − B", f"{cmp.difference:+.3f}",
             f"{cmp.level:.0%} paired bootstrap interval over {cmp.n} test examples ({cmp.resamples} resamples)"),
            (f"{cmp.level:.0%} interval", f"[{cmp.low:+.3f}, {cmp.high:+.3f}]", "contains 0: no detectable difference"),
            ("Verdict", cmp.verdict, "A better / B better when the interval excludes 0")]
