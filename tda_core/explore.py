"""Computations behind the explorer: top-k proponents/opponents, the reverse view, comparing two
settings, agreement between members, test-example tables and thumbnails.

Everything takes plain score matrices ``scores[n_train, n_test]`` (higher = more helpful) and a
`Dataset`, so it works the same from Python, the CLI and the app.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from .data import Dataset
from .errors import UserError


def as_numpy(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Scores as a float64 numpy array."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    return np.asarray(scores, dtype=np.float64)


def _check(index: int, n: int, what: str) -> None:
    if not 0 <= index < n:
        raise UserError(f"{what} position {index} is out of range; choose 0..{n - 1}")


def _label(dataset: Dataset, y: torch.Tensor) -> str:
    """A readable label: the class name, or 'window' for music windows."""
    if y.dim() == 0 and dataset.class_names:
        return dataset.class_names[int(y)]
    return "window"


def top_k(scores: np.ndarray | torch.Tensor, test_pos: int, k: int, dataset: Dataset) -> pd.DataFrame:
    """The k strongest proponents and k strongest opponents of one test example.

    Columns: role ('proponent' / 'opponent'), rank (1 = strongest), position (row in the
    training set), source_index (position in the original data), label, score.
    """
    s = as_numpy(scores)
    _check(test_pos, s.shape[1], "test")
    return _ranking(s[:, test_pos], k, ("proponent", "opponent"), dataset, "train")


def _ranking(values: np.ndarray, k: int, roles: tuple[str, str], dataset: Dataset, split: str) -> pd.DataFrame:
    """The k highest (first role) and k lowest (second role) of `values`, one per example of `split`."""
    _, y, index = dataset.split(split)
    k = max(1, min(k, len(values)))
    order = np.argsort(-values, kind="stable")
    rows = []
    for role, picked in zip(roles, (order[:k], order[::-1][:k])):
        for rank, pos in enumerate(picked, start=1):
            rows.append({"role": role, "rank": rank, "position": int(pos), "source_index": int(index[pos]),
                         "label": _label(dataset, y[pos]), "score": float(values[pos])})
    return pd.DataFrame(rows)


def reverse_top_k(scores: np.ndarray | torch.Tensor, train_pos: int, k: int, dataset: Dataset) -> pd.DataFrame:
    """The test examples a training example helps most ('helps') and hurts most ('hurts')."""
    s = as_numpy(scores)
    _check(train_pos, s.shape[0], "training")
    return _ranking(s[train_pos], k, ("helps", "hurts"), dataset, "test")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How two settings agree on one test example."""

    k: int
    overlap: int  # training examples in both top-k proponent lists
    opponent_overlap: int  # same for the top-k opponents
    spearman: float  # rank correlation of the two score columns over the whole training set


def compare(scores_a: np.ndarray | torch.Tensor, scores_b: np.ndarray | torch.Tensor,
            test_pos: int, k: int) -> Comparison:
    """Overlap of the top-k proponents/opponents and Spearman correlation of two settings' scores."""
    a, b = as_numpy(scores_a), as_numpy(scores_b)
    if a.shape != b.shape:
        raise UserError(f"the two settings score different examples ({a.shape} vs {b.shape}); "
                        "compare settings of the same task")
    _check(test_pos, a.shape[1], "test")
    col_a, col_b = a[:, test_pos], b[:, test_pos]
    k = max(1, min(k, len(col_a)))
    top_a, top_b = np.argsort(-col_a)[:k], np.argsort(-col_b)[:k]
    bot_a, bot_b = np.argsort(col_a)[:k], np.argsort(col_b)[:k]
    rho = spearmanr(col_a, col_b).statistic
    return Comparison(k, len(set(top_a) & set(top_b)), len(set(bot_a) & set(bot_b)),
                      float(rho) if np.isfinite(rho) else 0.0)


def member_agreement(member_scores: list[np.ndarray | torch.Tensor]) -> pd.DataFrame:
    """Mean over test examples of the column Spearman between every pair of members and with their mean.

    Returns a square table indexed by 'member 1'..'member n' and 'average'.
    """
    from scipy.stats import rankdata

    mats = [as_numpy(m) for m in member_scores]
    if not mats:
        raise UserError("no members to compare")
    mats.append(np.mean(mats, axis=0))
    normed = []  # per matrix: column ranks, centred and scaled to unit norm, so a Spearman is a dot product
    for m in mats:
        r = rankdata(m, axis=0)
        r -= r.mean(0)
        norm = np.sqrt((r ** 2).sum(0))
        normed.append(np.divide(r, norm, out=np.full_like(r, np.nan), where=norm > 0))
    names = [f"member {i + 1}" for i in range(len(mats) - 1)] + ["average"]
    table = np.ones((len(mats), len(mats)))
    for i in range(len(mats)):
        for j in range(i + 1, len(mats)):
            table[i, j] = table[j, i] = np.nanmean((normed[i] * normed[j]).sum(0))
    return pd.DataFrame(table, index=names, columns=names)


def example_table(dataset: Dataset, predictions: np.ndarray | torch.Tensor | None = None) -> pd.DataFrame:
    """One row per test example: position, source_index, label and, given predictions, predicted and correct."""
    frame = pd.DataFrame({"position": np.arange(dataset.n_test),
                          "source_index": dataset.test_index.numpy().astype(np.int64)})
    if dataset.y_test.dim() == 1:
        frame["label"] = [dataset.class_names[int(y)] for y in dataset.y_test]
        if predictions is not None:
            pred = np.asarray(predictions)
            frame["predicted"] = [dataset.class_names[int(p)] for p in pred]
            frame["correct"] = pred == dataset.y_test.numpy()
    return frame


def filter_tests(table: pd.DataFrame, labels: list[str] | None = None, correctness: str = "all") -> pd.DataFrame:
    """Rows of `example_table` with a label in `labels` (None = any) and correctness 'all' / 'correct' / 'wrong'."""
    out = table
    if labels:
        out = out[out["label"].isin(labels)]
    if correctness != "all":
        if "correct" not in out:
            raise UserError("correct/wrong needs the model's predictions; choose 'all'")
        out = out[out["correct"] == (correctness == "correct")]
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Predicted class of every example (argmax of the logits) with a model in eval mode."""
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def thumbnail(image: np.ndarray, size: int = 84) -> np.ndarray:
    """Upscale a small uint8 image by pixel repetition (crisp, no blur) to about `size` pixels wide."""
    factor = max(1, size // image.shape[1])
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 image as a PNG data URI (for image columns of tables)."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnails(dataset: Dataset, split: str, positions: list[int] | np.ndarray, size: int = 84) -> list[np.ndarray]:
    """Crisp thumbnails of several examples of one split."""
    return [thumbnail(dataset.image(split, int(p)), size) for p in positions]


def caption(row: pd.Series | dict, compact: bool = False) -> str:
    """A caption for a top-k row: label, source index and score (compact: label and score)."""
    if compact:
        return f"{row['label']} · {row['score']:+.2g}"
    return f"{row['label']} · #{row['source_index']} · {row['score']:+.3g}"


def dataset_rows(data_root: str | None = None) -> pd.DataFrame:
    """Every registered dataset with its kind, where its data comes from right now and a description."""
    from .data import REGISTRY
    from .paths import data_dir

    root = data_dir(data_root)
    rows = []
    for name, info in sorted(REGISTRY.items()):
        status = info.locate(root)
        rows.append({"dataset": name, "kind": info.kind, "status": status.status,
                     "description": info.description, "where": status.where})
    return pd.DataFrame(rows)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def store_overview(store) -> pd.DataFrame:  # noqa: ANN001 - a tda_core Store
    """What the store holds: artifacts per kind with their total size, readable."""
    summary = store.summary()
    if summary.empty:
        return summary
    summary = summary.copy()
    summary["size"] = summary["bytes"].map(human_bytes)
    return summary[["kind", "artifacts", "size"]]


def describe_example(dataset: Dataset, split: str, position: int) -> str:
    """'label 7 · #1234' (source index) for one example of a split."""
    _, y, index = dataset.split(split)
    _check(position, len(y), split)
    return f"{_label(dataset, y[position])} · #{int(index[position])}"


def example_label(table: pd.DataFrame, position: int) -> str:
    """A selector label for a row of `example_table`: position, label and, when known, the prediction."""
    row = table.set_index("position").loc[position]
    text = f"{position} · #{row['source_index']}"
    if "label" in row:
        text += f" · label {row['label']}"
    if "predicted" in row:
        text += f" · predicted {row['predicted']}" + ("" if row["correct"] else " ✗")
    return text


def hub_share(scores: np.ndarray | torch.Tensor, k: int) -> float:
    """Distinct training examples among all test examples' top-k proponents, as a share of the most possible.

    Near 0: the same few training examples top every list (typical of Grad-Dot's large-gradient
    outliers); near 1: every test example gets its own proponents.
    """
    s = as_numpy(scores)
    k = max(1, min(k, s.shape[0]))
    top = np.argpartition(-s, k - 1, axis=0)[:k]
    return len(np.unique(top)) / min(s.shape[0], k * s.shape[1])


def lds_scatter(scores: np.ndarray | torch.Tensor, subsets: np.ndarray | torch.Tensor,
                values: np.ndarray | torch.Tensor, test_pos: int) -> tuple[pd.DataFrame, float]:
    """For one test example: predicted (sum of its scores over each subset) vs actual (target of the model
    trained on that subset), one row per subset, and their Spearman correlation (that example's LDS)."""
    from .evaluation import datamodel_predictions

    s = as_numpy(scores)
    _check(test_pos, s.shape[1], "test")
    predicted = datamodel_predictions(s[:, [test_pos]], np.asarray(subsets))[:, 0]
    actual = np.asarray(values, dtype=np.float64)[:, test_pos]
    rho = spearmanr(predicted, actual).statistic
    frame = pd.DataFrame({"subset": np.arange(len(actual)), "predicted": predicted, "actual": actual})
    return frame, float(rho) if np.isfinite(rho) else float("nan")


def has_ground_truth(task, spec, store, device: str = "auto") -> bool:  # noqa: ANN001 - TaskSpec, EvalSpec, Store
    """True when the ground truth of (task, spec) is already in the store (so showing LDS costs nothing)."""
    from .evaluation import missing_models

    return missing_models(task, spec, store=store, device=device) == 0


def lds_ladder(member_scores: list[np.ndarray | torch.Tensor], truth) -> pd.DataFrame:  # noqa: ANN001 - GroundTruth
    """LDS (mean, sem) of the average of the first 1, 2, ... n members against a ground truth."""
    from .evaluation import lds_against

    rows, total = [], None
    for n, scores in enumerate(member_scores, start=1):
        total = as_numpy(scores) if total is None else total + as_numpy(scores)
        result = lds_against(total / n, truth)
        rows.append({"members averaged": n, "LDS": round(result.mean, 3), "± sem": round(result.sem, 3)})
    return pd.DataFrame(rows)


def counterfactual_frame(task, scores: np.ndarray | torch.Tensor, test_pos: int, k: int,
                         progress=None) -> tuple[pd.DataFrame, str]:  # noqa: ANN001 - TaskSpec, Progress
    """Run the counterfactual check for one test example and return (one row per removal, a summary sentence)."""
    from .evaluation import counterfactual

    result = counterfactual(task, as_numpy(scores)[:, test_pos], test_pos, k, progress=progress)
    n_random = len(result.random_changes)
    frame = pd.DataFrame({"removed": [f"top-{k} proponents"] + [f"{k} random examples"] * n_random,
                          "change": [result.top_change, *result.random_changes.tolist()]})
    summary = (f"Margin with the full training set: **{result.base:.2f}**. Without the top-{k} proponents: "
               f"**{result.top_change:+.2f}**; without {k} random examples: **{result.random_mean:+.2f}** on average "
               f"over {n_random} draws ({result.fraction_random_below:.0%} of random draws lowered "
               f"it as much). Averaged over training seeds {result.seeds}.")
    return frame, summary


def base_predictions(task, ensemble, store=None) -> np.ndarray:  # noqa: ANN001 - TaskSpec, EnsembleSpec, Store
    """Predicted test classes of an ensemble's first base model (from the store; trained if missing)."""
    from .data import load_dataset
    from .ensembles import base_seeds
    from .training import load_or_train

    dataset = load_dataset(task.dataset)
    (first,) = load_or_train(task, base_seeds(ensemble)[:1], store=store, dataset=dataset)
    return predict(first.model, dataset.x_test)


def breakdown_table(costs) -> pd.DataFrame:  # noqa: ANN001 - a Costs record
    """The named seconds of a cost breakdown, largest first."""
    rows = [{"step": name.removesuffix("_s").replace("_", " "), "seconds": round(float(v), 3)}
            for name, v in costs.breakdown.items() if isinstance(v, (int, float))]
    return pd.DataFrame(rows, columns=["step", "seconds"]).sort_values("seconds", ascending=False)


def seconds_per_model(attribution) -> float:  # noqa: ANN001 - an Attribution
    """Seconds one base model of this attribution took to train (as recorded when it was trained)."""
    costs = attribution.costs
    return costs.breakdown.get("base_train_s", costs.train_s) / max(1, costs.n_trained)


# --- results table (LDS vs cost) ---------------------------------------------------------------------
SETTING_COLUMNS = ("task", "method", "proj", "proj_dim", "ensemble", "I", "D", "L", "P", "shared_projection",
                   "damping")


def results_frame(store) -> pd.DataFrame:  # noqa: ANN001 - a Store
    """The store's results table (last row per setting) with its `series` (ensemble kind, shared projection
    marked) and a readable `setting` label per row."""
    from .experiments import RESULTS_TABLE, series_label

    frame = store.read_table(RESULTS_TABLE)
    if frame.empty:
        return frame
    if "setting_key" in frame:
        frame = frame.drop_duplicates("setting_key", keep="last")
    frame = frame.assign(series=frame.apply(series_label, axis=1), budget=frame.apply(_budget, axis=1))
    return frame.assign(setting=frame.apply(_setting_label, axis=1)).reset_index(drop=True)


def _budget(row: pd.Series) -> str:
    """'I2 D5' and the like: the ensemble's size in a few characters."""
    extra = {"dropout": "D", "dropout-forward": "D", "lora": "L", "proj-seeds": "P"}.get(row["ensemble"])
    return f"I{row['I']}" + (f" {extra}{row[extra]}" if extra else "")


def _setting_label(row: pd.Series) -> str:
    return f"{row['method']} ({row['proj']}) · {row['series']} {row['budget']}"


def filter_results(frame: pd.DataFrame, methods: list[str] | None = None, projections: list[str] | None = None,
                   series: list[str] | None = None) -> pd.DataFrame:
    """Rows whose method, projection and series are among the chosen ones (empty choice = all)."""
    keep = pd.Series(True, index=frame.index)
    for column, chosen in (("method", methods), ("proj", projections), ("series", series)):
        if chosen:
            keep &= frame[column].astype(str).isin(chosen)
    return frame[keep]


def lds_cost_figure(frame: pd.DataFrame, x: str, log_x: bool = False):  # noqa: ANN201 - plotly Figure
    """Scatter of LDS against a cost column: colour = ensemble series, symbol = method, hover = the full
    setting; the Pareto frontier as a dotted step line; the projection-seed control in grey."""
    import plotly.express as px
    import plotly.graph_objects as go

    from .experiments import COST_LABELS, SERIES_COLORS, pareto

    hover = {c: True for c in (*SETTING_COLUMNS, "lds_sem", "n_eval", "train_s", "serve_s", "space_bytes",
                               "n_members", "device") if c in frame}
    hover.update({"method": False})
    fig = px.scatter(frame, x=x, y="lds", color="series", symbol="method", error_y="lds_sem", text="budget",
                     hover_name="setting", hover_data=hover, log_x=log_x, color_discrete_map=SERIES_COLORS,
                     labels={x: COST_LABELS[x], "lds": "LDS", "series": "ensemble"})
    fig.update_traces(marker=dict(size=12, line=dict(width=1, color="white")), error_y=dict(thickness=1, width=3),
                      textposition="middle right", textfont=dict(size=11, color="#555"))
    front = pareto(frame, x)
    fig.add_trace(go.Scatter(x=front[x], y=front["lds"], mode="lines", name="Pareto frontier", hoverinfo="skip",
                             line=dict(color="#222", dash="dot", shape="hv", width=1.5)))
    fig.update_layout(height=520, template="plotly_white", legend=dict(title=None),
                      margin=dict(l=10, r=10, t=30, b=10), yaxis_title="LDS (higher is better)")
    return fig


def results_display(frame: pd.DataFrame) -> pd.DataFrame:
    """The results table for people: setting columns first, LDS and costs rounded, bytes readable."""
    out = frame.drop(columns=["setting", "series", "budget", "setting_key"], errors="ignore")
    out = out.round({"lds": 3, "lds_sem": 3, "lds_validation": 3, "train_s": 2, "serve_s": 2})
    if "space_bytes" in out:
        out.insert(out.columns.get_loc("space_bytes"), "space", out["space_bytes"].map(human_bytes))
        out = out.drop(columns=["space_bytes"])
    return out.sort_values("lds", ascending=False)


def is_recorded(result, store) -> bool:  # noqa: ANN001 - experiments.Result, Store
    """True when the result's setting already has a row in the results table."""
    from .experiments import RESULTS_TABLE

    table = store.read_table(RESULTS_TABLE)
    return "setting_key" in table and result.setting_key in set(table["setting_key"])


def record(result, store) -> None:  # noqa: ANN001 - experiments.Result, Store
    """Append a result's row to the results table (read by the LDS vs cost page)."""
    from .experiments import RESULTS_TABLE

    store.append_rows(RESULTS_TABLE, [result.row()], unique_by="setting_key")


def all_stored(task, settings, store) -> bool:  # noqa: ANN001 - TaskSpec, [(MethodSpec, EnsembleSpec)], Store
    """True when every (method, ensemble) attribution of `task` is already in the store."""
    from .attribution import scores_stored

    return all(scores_stored(task, method, ensemble, store) for method, ensemble in settings)
