"""Experiments: one setting's LDS with its costs (`run`), grids of settings (`sweep`), the Pareto frontier.

Damping protocol: when `MethodSpec.damping` is None (and the method is damped), c is chosen from
`DAMPING_GRID` by LDS on a validation split of the test set (`VALIDATION_FRACTION` of the test
positions, drawn from the evaluation seed); the reported LDS is always on the remaining test
positions, also when c is fixed, so tuned and fixed rows compare on the same examples.
"""
from __future__ import annotations

import dataclasses
import platform
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from . import attribution
from .costs import Costs
from .data import load_dataset
from .device import resolve_device
from .ensembles import base_seeds
from .errors import UserError, unknown_choice
from .evaluation import GroundTruth, ground_truth, lds_against, missing_models
from .methods import DAMPED
from .progress import Progress, report
from .specs import EnsembleSpec, EvalSpec, MethodSpec, TaskSpec
from .store import Store, spec_key
from .tasks import get_task

DAMPING_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
VALIDATION_FRACTION = 0.2
RESULTS_TABLE = "results"
COST_COLUMNS = ("train_s", "serve_s", "space_bytes", "n_trained", "n_members")
ROW_COLUMNS = ("task", "method", "proj", "proj_dim", "ensemble", "I", "D", "L", "P", "shared_projection", "lds",
               "lds_sem", "damping", "damping_tuned", "lds_validation", "n_eval", "train_s", "serve_s", "space_bytes",
               "n_trained", "n_members", "device", "M", "alpha", "runs", "setting_key")


# --- the validation split -----------------------------------------------------------------------
def validation_split(n_test: int, seed: int, fraction: float = VALIDATION_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(validation, evaluation) test positions, sorted: a random `fraction` (at least 1) drawn from `seed`."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"validation fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(fraction * n_test)))
    if n_val >= n_test:
        raise UserError(f"{n_test} test examples are too few to hold out a validation split")
    perm = np.random.default_rng([seed, 11]).permutation(n_test)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


# --- one setting ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One setting's scores, LDS (on the evaluation split), costs and provenance."""

    task: str
    method: MethodSpec
    ensemble: EnsembleSpec
    eval: EvalSpec
    scores: torch.Tensor  # [n_train, n_test] at the damping used, every test position
    lds: float
    lds_sem: float
    n_eval: int
    damping: float | None
    damping_tuned: bool
    validation_lds: dict[float, float]  # c -> LDS on the validation split (empty when not tuned)
    costs: Costs
    provenance: dict
    setting_key: str

    def row(self) -> dict:
        """The flat results-table row (columns `ROW_COLUMNS`)."""
        e, c = self.ensemble, self.costs
        return {"task": self.task, "method": self.method.name, "proj": self.method.proj,
                "proj_dim": self.method.proj_dim, "ensemble": e.kind,
                "I": e.I, "D": e.D, "L": e.L, "P": e.P, "shared_projection": e.shared_projection,
                "lds": self.lds, "lds_sem": self.lds_sem, "damping": self.damping,
                "damping_tuned": self.damping_tuned,
                "lds_validation": self.validation_lds.get(self.damping) if self.damping_tuned else None,
                "n_eval": self.n_eval, "train_s": c.train_s, "serve_s": c.serve_s, "space_bytes": c.space_bytes,
                "n_trained": c.n_trained, "n_members": c.n_members, "device": c.device, "M": self.eval.M,
                "alpha": self.eval.alpha, "runs": self.eval.runs, "setting_key": self.setting_key}


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import scipy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__}


def tunes_damping(method: MethodSpec) -> bool:
    """True when c is to be chosen on the validation split."""
    return method.name in DAMPED and method.damping is None


def setting_key(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, eval_spec: EvalSpec,
                device: torch.device, dampings: Sequence[float] = DAMPING_GRID,
                fraction: float = VALIDATION_FRACTION) -> str:
    """Identity of one results-table row (what makes a sweep resumable)."""
    protocol = {"grid": list(dampings), "fraction": fraction} if tunes_damping(method) else {"fraction": fraction}
    return spec_key({"task": task, "method": method, "ensemble": ensemble, "eval": eval_spec,
                     "device": device.type, "protocol": protocol, **attribution.scheme_identity(method)})


def run(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, eval_spec: EvalSpec = EvalSpec(), *,
        store: Store | None = None, device: str = "auto", dampings: Sequence[float] = DAMPING_GRID,
        validation_fraction: float = VALIDATION_FRACTION, truth: GroundTruth | None = None,
        progress: Progress | None = None) -> Result:
    """Attribute with one setting and score it by LDS; every stored artifact is reused."""
    task = get_task(task) if isinstance(task, str) else task
    store = store or Store()
    dev = resolve_device(device)
    truth = truth or ground_truth(task, eval_spec, store=store, device=dev, progress=progress)
    val, rest = validation_split(truth.values.shape[1], eval_spec.seed, validation_fraction)
    tuned = tunes_damping(method)
    att = attribution.attribute(task, method, ensemble, store=store, device=device,
                                dampings=list(dampings) if tuned else None, progress=progress)
    validation: dict[float, float] = {}
    damping = att.damping
    scores = att.scores
    if tuned:
        validation = {c: lds_against(s[:, val], truth, val).mean for c, s in sorted(att.scores_by_damping.items())}
        damping = max(validation, key=lambda c: (np.nan_to_num(validation[c], nan=-np.inf), -c))
        scores = att.scores_by_damping[damping]
    result = lds_against(scores[:, rest], truth, rest)
    provenance = {"versions": versions(), "device": att.costs.device,
                  "seeds": {"base_models": base_seeds(ensemble), "ensemble": ensemble.seed, "projection": method.seed,
                            "eval": eval_spec.seed},
                  "data": load_dataset(task.dataset).source,
                  "damping": damping, "damping_tuned": tuned, "validation_positions": len(val),
                  "ground_truth": truth.key, "attribution": att.key, "members": att.members,
                  "costs_from_store": att.costs.from_store}
    return Result(task.name, method, ensemble, eval_spec, scores, result.mean, result.sem, result.n, damping, tuned,
                  validation, att.costs, provenance,
                  setting_key(task, method, ensemble, eval_spec, dev, dampings, validation_fraction))


# --- grids ----------------------------------------------------------------------------------------
def _paper_grid() -> list[EnsembleSpec]:
    out = [EnsembleSpec("naive", I=i) for i in (1, 2, 5, 10)]
    for kind in ("dropout", "dropout-forward"):
        out += [EnsembleSpec(kind, I=i, D=d) for i in (1, 2, 5) for d in (5, 10)]
    out += [EnsembleSpec("lora", I=i, L=5) for i in (1, 2)]
    # issue 7 controls: projection seeds matching D and L, and members sharing one projection
    out += [EnsembleSpec("proj-seeds", I=i, P=p) for i in (1, 2, 5) for p in (5, 10)]
    out += [EnsembleSpec("dropout", I=i, D=d, shared_projection=True) for i in (1, 2, 5) for d in (5, 10)]
    out += [EnsembleSpec("lora", I=i, L=5, shared_projection=True) for i in (1, 2)]
    return out


def _small_grid() -> list[EnsembleSpec]:
    return [EnsembleSpec("naive", I=1), EnsembleSpec("naive", I=2), EnsembleSpec("dropout", I=1, D=2),
            EnsembleSpec("dropout", I=1, D=2, shared_projection=True), EnsembleSpec("dropout-forward", I=1, D=2),
            EnsembleSpec("proj-seeds", I=1, P=2), EnsembleSpec("lora", I=1, L=2, lora_epochs=1)]


GRIDS = {"paper": _paper_grid, "small": _small_grid}


def grid_settings(name: str) -> list[EnsembleSpec]:
    """The ensemble settings of a named grid (`paper`, `small`)."""
    if name not in GRIDS:
        raise unknown_choice("grid", name, sorted(GRIDS))
    return GRIDS[name]()


# --- sweeps ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepPlan:
    """What a sweep will do, shown before it starts."""

    task: TaskSpec
    eval: EvalSpec
    settings: list[tuple[MethodSpec, EnsembleSpec, str]]  # (method, ensemble, setting key), in order
    done: set[str]
    ground_truth_models: int  # subset models still to train
    base_models: int  # full-data models still to train
    member_passes: int  # members scored over the pending settings
    fits: bool
    message: str

    @property
    def pending(self) -> list[tuple[MethodSpec, EnsembleSpec, str]]:
        return [s for s in self.settings if s[2] not in self.done]

    def describe(self) -> str:
        return (f"{self.task.name}: {len(self.settings)} settings, {len(self.settings) - len(self.pending)} already in "
                f"the results table, {len(self.pending)} to run; ground truth: {self.ground_truth_models} of "
                f"{self.eval.M * self.eval.runs} subset models to train; {self.base_models} base model(s) to train; "
                f"{self.member_passes} member passes (features of members already cached are read from the store)"
                + ("" if self.fits else f"; DOES NOT FIT: {self.message}"))


def sweep_settings(methods: Sequence[str], grid: str, projections: Sequence[str] = ("kron",),
                   damping: float | None = None, proj_dim: int = 2048) -> list[tuple[MethodSpec, EnsembleSpec]]:
    """(method, ensemble) pairs of a sweep: every projection x method x grid setting."""
    pairs = []
    for proj in projections:
        for name in methods:
            method = MethodSpec(name=name, proj=proj, proj_dim=proj_dim, damping=damping if name in DAMPED else None)
            pairs += [(method, ens) for ens in grid_settings(grid)]
    return pairs


def plan_sweep(task: str | TaskSpec, pairs: Sequence[tuple[MethodSpec, EnsembleSpec]],
               eval_spec: EvalSpec = EvalSpec(), *, store: Store | None = None, device: str = "auto",
               table: str = RESULTS_TABLE) -> SweepPlan:
    """Count the work of a sweep: pending settings, models to train, member passes, whether each fits."""
    task = get_task(task) if isinstance(task, str) else task
    store = store or Store()
    dev = resolve_device(device)
    dataset = load_dataset(task.dataset)
    settings = [(m, e, setting_key(task, m, e, eval_spec, dev)) for m, e in pairs]
    existing = store.read_table(table)
    done = set(existing["setting_key"]) if "setting_key" in existing else set()
    gt_missing = missing_models(task, eval_spec, store=store, device=dev, dataset=dataset)
    to_train: set[int] = set()
    passes, problems = 0, []
    for method, ens, key in settings:
        if key in done:
            continue
        wp = attribution.plan(task, method, ens, store, device=dev, dampings=DAMPING_GRID, dataset=dataset)
        to_train.update(wp.models_to_train)
        passes += len(wp.members)
        if not wp.fits and wp.message not in problems:
            problems.append(wp.message)
    return SweepPlan(task, eval_spec, settings, done, gt_missing, len(to_train), passes, not problems,
                     "; ".join(problems))


def sweep(task: str | TaskSpec, methods: Sequence[str], grid: str = "paper", *,
          projections: Sequence[str] = ("kron",), eval_spec: EvalSpec = EvalSpec(), damping: float | None = None,
          store: Store | None = None, device: str = "auto", table: str = RESULTS_TABLE,
          progress: Progress | None = None) -> pd.DataFrame:
    """Run every setting of a grid not yet in the results table, appending one row per setting as it finishes.

    Returns the rows of all the grid's settings (new and earlier), in grid order.
    """
    task = get_task(task) if isinstance(task, str) else task
    store = store or Store()
    pairs = sweep_settings(methods, grid, projections, damping)
    sp = plan_sweep(task, pairs, eval_spec, store=store, device=device, table=table)
    if not sp.fits:
        raise UserError(sp.message)
    pending = sp.pending
    truth = ground_truth(task, eval_spec, store=store, device=device, progress=progress) if pending else None
    for n, (method, ens, key) in enumerate(pending):
        with store.lock("settings", key):  # a concurrent sweep computes each setting once; the other skips it
            if key not in set(store.read_table(table).get("setting_key", [])):
                result = run(task, method, ens, eval_spec, store=store, device=device, truth=truth, progress=progress)
                store.append_rows(table, [result.row()], unique_by="setting_key")
        report(progress, n + 1, len(pending), "settings")
    return results_for(store.read_table(table), [key for _, _, key in sp.settings])


def results_for(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows of `frame` for the given setting keys, in that order (the last row of a key wins)."""
    if frame.empty:
        return frame
    last = frame.drop_duplicates("setting_key", keep="last").set_index("setting_key")
    present = [k for k in keys if k in last.index]
    return last.loc[present].reset_index()[list(frame.columns)]


# --- the Pareto frontier --------------------------------------------------------------------------
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


# --- the LDS-vs-cost figure -----------------------------------------------------------------------
COST_LABELS = {"train_s": "training seconds", "serve_s": "serving seconds", "space_bytes": "space (bytes)",
               "n_trained": "independently trained models", "n_members": "members"}
SERIES_COLORS = {"naive": "#4C78A8", "dropout": "#E45756", "dropout (shared proj.)": "#FF9DA6",
                 "dropout-forward": "#F58518", "lora": "#54A24B", "lora (shared proj.)": "#88D27A",
                 "proj-seeds": "#9D9D9D"}


def series_label(row: pd.Series) -> str:
    """The series a row belongs to: ensemble kind, marked when its members share a projection."""
    shared = str(row.get("shared_projection")).lower() == "true"
    return f"{row['ensemble']} (shared proj.)" if shared and row["ensemble"] in ("dropout", "lora") else row["ensemble"]


def sweep_figure(df: pd.DataFrame, x: str = "train_s", log_x: bool = True):  # noqa: ANN201 - a plotly Figure
    """LDS (with standard error) against a cost column: one panel per (method, projection), one line per
    ensemble series through its settings in cost order, the Pareto frontier of each panel dotted."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if x not in COST_LABELS:
        raise unknown_choice("x axis", x, list(COST_LABELS))
    df = df.assign(series=df.apply(series_label, axis=1))
    methods, projs = sorted(df["method"].unique()), sorted(df["proj"].unique())
    fig = make_subplots(rows=len(methods), cols=len(projs), shared_yaxes=True, shared_xaxes=False,
                        subplot_titles=[f"{m} · {p} projection" for m in methods for p in projs],
                        vertical_spacing=0.12, horizontal_spacing=0.06)
    shown: set[str] = set()
    for r, method in enumerate(methods, 1):
        for c, proj in enumerate(projs, 1):
            panel = df[(df["method"] == method) & (df["proj"] == proj)]
            for series, part in panel.groupby("series", sort=False):
                part = part.sort_values(x)
                label = [f"I={i}" + (f" D={d}" if s.startswith("dropout") else f" L={l}" if s.startswith("lora")
                                     else f" P={p}" if s == "proj-seeds" else "")
                         for i, d, l, p, s in zip(part["I"], part["D"], part["L"], part["P"], part["series"])]
                fig.add_trace(go.Scatter(x=part[x], y=part["lds"], error_y=dict(array=part["lds_sem"], width=2),
                                         mode="lines+markers", name=series, legendgroup=series,
                                         showlegend=series not in shown, text=label,
                                         hovertemplate="%{text}<br>LDS %{y:.3f}<br>" + x + " %{x:.3g}",
                                         line=dict(color=SERIES_COLORS.get(series, "#333"), width=1.5,
                                                   dash="dash" if series == "proj-seeds" else "solid")),
                              row=r, col=c)
                shown.add(series)
            front = pareto(panel, x)
            fig.add_trace(go.Scatter(x=front[x], y=front["lds"], mode="lines", line=dict(color="black", dash="dot",
                                     shape="hv", width=1), name="Pareto frontier", legendgroup="pareto",
                                     showlegend="pareto" not in shown, hoverinfo="skip"), row=r, col=c)
            shown.add("pareto")
            fig.update_xaxes(title_text=COST_LABELS[x], type="log" if log_x else "linear", row=r, col=c)
        fig.update_yaxes(title_text="LDS", row=r, col=1)
    fig.update_layout(height=380 * len(methods) + 80, width=560 * len(projs) + 200, template="plotly_white",
                      title=f"LDS against {COST_LABELS[x]} ({', '.join(sorted(df['task'].unique()))})")
    return fig
