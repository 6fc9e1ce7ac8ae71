"""Experiments: one setting's LDS with its costs (`run`) and grids of settings (`sweep`) into the results table.

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
from .comparison import DEFAULT_RESAMPLES, PairedComparison, paired_bootstrap
from .context import Context, resolve
from .costs import Costs
from .data import Dataset, load_dataset
from .data.base import remember_dataset
from .ensembles import base_seeds, check_setting
from .errors import UserError, unknown_choice
from .executors import Executor, Task
from .evaluation import (Ceiling, GroundTruth, ground_truth, ground_truth_ceiling, lds_against, lds_of_examples,
                         missing_models)
from .progress import Progress, report
from .results import RESULTS_TABLE, results_for, setting_label
from .settings import describe
from .specs import EnsembleSpec, EvalSpec, MethodSpec, TaskSpec, method_record
from .store import Store, spec_key
from .training import load_or_train

DAMPING_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
VALIDATION_FRACTION = 0.2
LDS_KIND = "lds"  # per-example LDS of a results row, by setting key
REPLICATE_SEED_STRIDE = 1000  # replicate r trains base models from ensemble seed + 1000 r
ROW_COLUMNS = ("task", "method", "proj", "proj_dim", "ensemble", "I", "D", "L", "P", "shared_projection", "lds",
               "lds_sem", "lds_rep_se", "replicates", "damping", "damping_tuned", "lds_validation", "n_eval",
               "train_s", "serve_s", "space_bytes", "n_trained", "n_members", "device", "M", "alpha", "runs",
               "reliability", "ceiling", "proj_dtype", "setting_key", "wall_s", "workers")


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
    """One setting's scores, LDS (on the evaluation split) over its seed replicates, costs and provenance.

    Per-example LDS are kept per replicate (`per_example`: [replicates, evaluation examples], `validation`:
    the same on the validation split) so two settings can be compared pairwise (tda_core/comparison.py).
    """

    task: str
    method: MethodSpec
    ensemble: EnsembleSpec
    eval: EvalSpec
    scores: torch.Tensor  # replicate 0's [n_train, n_test] at the damping used, every test position
    lds: float  # mean over replicates and evaluation examples
    lds_sem: float  # standard error over evaluation examples of the replicate-averaged per-example LDS
    lds_rep_se: float  # standard error across replicates of their mean LDS (NaN with one replicate)
    n_eval: int
    damping: float | None  # replicate 0's
    damping_tuned: bool
    validation_lds: dict[float, float]  # c -> LDS on the validation split, replicate 0 (empty when not tuned)
    costs: Costs  # per replicate, averaged over replicates
    provenance: dict
    setting_key: str
    per_example: np.ndarray
    validation: np.ndarray
    ceiling: Ceiling
    uncovered: list[str]  # parameter names the projection left out, over every replicate ([] with full coverage)

    @property
    def replicates(self) -> int:
        return len(self.per_example)

    def row(self) -> dict:
        """The flat results-table row (columns `ROW_COLUMNS`)."""
        e, c = self.ensemble, self.costs
        return {"task": self.task, "method": self.method.name, "proj": self.method.proj,
                "proj_dim": self.method.proj_dim, "ensemble": e.kind,
                "I": e.I, "D": e.D, "L": e.L, "P": e.P, "shared_projection": e.shared_projection,
                "lds": self.lds, "lds_sem": self.lds_sem, "lds_rep_se": self.lds_rep_se,
                "replicates": self.replicates, "damping": self.damping, "damping_tuned": self.damping_tuned,
                "lds_validation": float(np.nanmean(self.validation)),
                "n_eval": self.n_eval, "train_s": c.train_s, "serve_s": c.serve_s, "space_bytes": c.space_bytes,
                "n_trained": c.n_trained, "n_members": c.n_members, "device": c.device, "M": self.eval.M,
                "alpha": self.eval.alpha, "runs": self.eval.runs, "reliability": self.ceiling.mean_reliability,
                "ceiling": self.ceiling.ceiling, "proj_dtype": self.method.proj_dtype,
                "setting_key": self.setting_key, "wall_s": c.wall_s, "workers": c.workers}


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import scipy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__}


def tunes_damping(method: MethodSpec) -> bool:
    """True when c is to be chosen on the validation split."""
    return method_record(method.name).damped and method.damping is None


def setting_key(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, eval_spec: EvalSpec,
                device: torch.device, dampings: Sequence[float] = DAMPING_GRID,
                fraction: float = VALIDATION_FRACTION, replicates: int = 1) -> str:
    """Identity of one results-table row (what makes a sweep resumable)."""
    protocol = {"grid": list(dampings), "fraction": fraction} if tunes_damping(method) else {"fraction": fraction}
    if replicates > 1:  # keys of single-replicate rows stay as they were
        protocol["replicates"] = replicates
    return spec_key({"task": task, "method": method, "ensemble": ensemble, "eval": eval_spec,
                     "device": device.type, "protocol": protocol, **attribution.scheme_identity(method, device)})


def replicate_specs(method: MethodSpec, ensemble: EnsembleSpec, r: int) -> tuple[MethodSpec, EnsembleSpec]:
    """Replicate r of a setting: its own base models (seeds from ensemble seed + 1000 r), so its own masks and
    adapters, and its own projections and sampled labels (method seed + r). Replicate 0 is the setting itself."""
    if r == 0:
        return method, ensemble
    return (dataclasses.replace(method, seed=method.seed + r),
            dataclasses.replace(ensemble, seed=ensemble.seed + REPLICATE_SEED_STRIDE * r))


def _mean_costs(costs: list[Costs]) -> Costs:
    """Per-replicate costs averaged (what one replicate of the setting costs)."""
    first = costs[0]
    keys = {k for c in costs for k in c.breakdown}
    return dataclasses.replace(
        first, train_s=float(np.mean([c.train_s for c in costs])), serve_s=float(np.mean([c.serve_s for c in costs])),
        space_bytes=int(np.mean([c.space_bytes for c in costs])),
        serve_now_s=float(np.mean([c.serve_now_s for c in costs])), from_store=all(c.from_store for c in costs),
        wall_s=float(np.mean([c.wall_s for c in costs])), workers=max(c.workers for c in costs),
        breakdown={k: float(np.mean([c.breakdown.get(k, 0.0) for c in costs])) for k in sorted(keys)})


def run(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, eval_spec: EvalSpec = EvalSpec(), *,
        store: Store | None = None, device: str = "auto", dampings: Sequence[float] = DAMPING_GRID,
        validation_fraction: float = VALIDATION_FRACTION, truth: GroundTruth | None = None, replicates: int = 1,
        progress: Progress | None = None, executor: Executor | str | None = None) -> Result:
    """Attribute with one setting (`replicates` times, each with its own seeds) and score it by LDS on the
    evaluation split (damping tuned per replicate on the validation split); every stored artifact is reused."""
    task, ctx = resolve(task, store, device, progress, executor)
    store, dev = ctx.store, ctx.device
    if not isinstance(replicates, int) or replicates < 1 or replicates > 100:
        raise UserError(f"replicates must be an integer in 1..100, got {replicates!r}")
    check_setting(task, method, ensemble)  # refuse before any work
    truth = truth or ground_truth(task, eval_spec, store=store, device=dev, progress=progress, executor=ctx.executor)
    val, rest = validation_split(truth.values.shape[1], eval_spec.seed, validation_fraction)
    tuned = tunes_damping(method)
    atts, chosen, per_example, per_validation, validation = [], [], [], [], {}
    for r in range(replicates):
        m_r, e_r = replicate_specs(method, ensemble, r)
        att = attribution.attribute(task, m_r, e_r, store=store, device=dev,
                                    dampings=list(dampings) if tuned else None, progress=progress,
                                    executor=ctx.executor)
        damping, scores = att.damping, att.scores
        if tuned:
            grid = {float(c) for c in dampings}  # attribute also scores its main c, which may lie off the grid
            on_val = {c: lds_against(s[:, val], truth, val).mean for c, s in sorted(att.scores_by_damping.items())
                      if c in grid}
            damping = max(on_val, key=lambda c: (np.nan_to_num(on_val[c], nan=-np.inf), -c))
            scores = att.scores_by_damping[damping]
            validation = validation or on_val
        atts.append((att, scores))
        chosen.append(damping)
        per_example.append(lds_against(scores[:, rest], truth, rest).per_example)
        per_validation.append(lds_against(scores[:, val], truth, val).per_example)
    per_example, per_validation = np.stack(per_example), np.stack(per_validation)
    averaged = lds_of_examples(np.nanmean(per_example, axis=0))
    replicate_means = np.nanmean(per_example, axis=1)
    rep_se = float(replicate_means.std(ddof=1) / np.sqrt(replicates)) if replicates > 1 else float("nan")
    key = setting_key(task, method, ensemble, eval_spec, dev, dampings, validation_fraction, replicates)
    ceiling = ground_truth_ceiling(truth, rest)
    first = atts[0][0]
    provenance = {"versions": versions(), "device": first.costs.device,
                  "seeds": {"base_models": [base_seeds(replicate_specs(method, ensemble, r)[1])
                                            for r in range(replicates)],
                            "ensemble": ensemble.seed, "projection": method.seed, "eval": eval_spec.seed,
                            "replicate_seed_stride": REPLICATE_SEED_STRIDE},
                  "data": load_dataset(task.dataset).source,
                  "damping": chosen, "damping_tuned": tuned, "validation_positions": len(val),
                  "replicate_lds": replicate_means.tolist(),
                  "ground_truth": truth.key, "attribution": [a.key for a, _ in atts], "members": first.members,
                  "costs_from_store": all(a.costs.from_store for a, _ in atts)}
    result = Result(task.name, method, ensemble, eval_spec, atts[0][1], averaged.mean, averaged.sem, rep_se,
                    averaged.n, chosen[0], tuned, validation, _mean_costs([a.costs for a, _ in atts]), provenance,
                    key, per_example, per_validation, ceiling,
                    list(dict.fromkeys(name for a, _ in atts for name in a.uncovered)))
    store.save(LDS_KIND, key, {"evaluation": torch.from_numpy(per_example), "validation": torch.from_numpy(per_validation),
                               "evaluation_positions": torch.from_numpy(rest), "validation_positions": torch.from_numpy(val)},
               {"ground_truth": truth.key, "row": result.row()})
    return result


# --- paired comparisons ---------------------------------------------------------------------------
SPLITS = ("evaluation", "validation")


def compare_results(a: Result, b: Result, *, split: str = "evaluation", resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> PairedComparison:
    """A - B of two results on the same ground truth and split (per-example LDS paired, replicates resampled)."""
    if split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    if a.provenance["ground_truth"] != b.provenance["ground_truth"]:
        raise UserError("the two settings were scored against different ground truths; compare them on one")
    pick = (lambda r: r.per_example) if split == "evaluation" else (lambda r: r.validation)
    return paired_bootstrap(pick(a), pick(b), resamples=resamples, seed=seed,
                            labels=(describe(a.method, a.ensemble), describe(b.method, b.ensemble)))


def compare(task: str | TaskSpec, setting_a: tuple[MethodSpec, EnsembleSpec], setting_b: tuple[MethodSpec, EnsembleSpec],
            eval_spec: EvalSpec = EvalSpec(), *, replicates: int = 1, split: str = "evaluation",
            resamples: int = DEFAULT_RESAMPLES, seed: int = 0, dampings: Sequence[float] = DAMPING_GRID,
            store: Store | None = None, device: str = "auto", progress: Progress | None = None) -> PairedComparison:
    """Run two settings (method, ensemble) against one ground truth and compare their LDS pairwise."""
    task, ctx = resolve(task, store, device, progress)
    for method, ensemble in (setting_a, setting_b):
        check_setting(task, method, ensemble)
    truth = ground_truth(task, eval_spec, store=ctx.store, device=ctx.device, progress=progress)
    a, b = (run(task, m, e, eval_spec, store=ctx.store, device=ctx.device, dampings=dampings, truth=truth,
                replicates=replicates, progress=progress) for m, e in (setting_a, setting_b))
    return compare_results(a, b, split=split, resamples=resamples, seed=seed)


def compare_stored(store: Store, key_a: str, key_b: str, *, split: str = "evaluation",
                   resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> PairedComparison:
    """Compare two rows of the results table by setting key, from their stored per-example LDS."""
    if split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    found = [store.load(LDS_KIND, key) for key in (key_a, key_b)]
    missing = [key for key, art in zip((key_a, key_b), found) if art is None]
    if missing:
        raise UserError(f"no per-example LDS stored for setting {', '.join(missing)}; run it again (`python -m "
                        "tda_core run ...`) to store it")
    a, b = found
    if a.meta["ground_truth"] != b.meta["ground_truth"] or not torch.equal(a.tensors[f"{split}_positions"],
                                                                           b.tensors[f"{split}_positions"]):
        raise UserError("the two settings were scored against different ground truths or test splits")
    label = lambda art: setting_label(art.meta["row"])  # noqa: E731
    return paired_bootstrap(a.tensors[split].numpy(), b.tensors[split].numpy(), resamples=resamples, seed=seed,
                            labels=(label(a), label(b)))


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


def _readme_grid() -> list[EnsembleSpec]:
    """The settings the README's results table quotes (run with seed replicates)."""
    out = [EnsembleSpec("naive", I=i) for i in (1, 2, 5, 10)]
    out += [EnsembleSpec("dropout", I=i, D=d) for i in (1, 2) for d in (5, 10)]
    out += [EnsembleSpec("dropout-forward", I=2, D=d) for d in (5, 10)]
    out += [EnsembleSpec("lora", I=i, L=5) for i in (1, 2)]
    out += [EnsembleSpec("proj-seeds", I=i, P=p) for i in (1, 2) for p in (5, 10)]
    out += [EnsembleSpec("dropout", I=1, D=10, shared_projection=True)]
    return out


# LoRA fine-tuning length of the chorales ladder: the one with the highest validation LDS among 1, 2, 3 epochs
# (`python -m scripts.chorales_lora_epochs`; docs/chorales_lora_epochs.md)
CHORALES_LORA_EPOCHS = 3


def _ladder(naive_sizes: tuple[int, ...], lora_epochs: int = EnsembleSpec.lora_epochs) -> list[EnsembleSpec]:
    """The research's ladder for a model family: naive I = `naive_sizes`; Dropout I = 1, D = 5 / 10 and I = 2,
    D = 5; LoRA I = 1, L = 5; the projection-seed controls of those members (P = 5, 10 at I = 1; P = 5 at I = 2)."""
    out = [EnsembleSpec("naive", I=i) for i in naive_sizes]
    out += [EnsembleSpec("dropout", I=1, D=5), EnsembleSpec("dropout", I=1, D=10), EnsembleSpec("dropout", I=2, D=5)]
    out += [EnsembleSpec("lora", I=1, L=5, lora_epochs=lora_epochs)]
    out += [EnsembleSpec("proj-seeds", I=1, P=5), EnsembleSpec("proj-seeds", I=1, P=10),
            EnsembleSpec("proj-seeds", I=2, P=5)]
    return out


def _chorales_grid() -> list[EnsembleSpec]:
    """The music ladder (docs/results_chorales_cpu.md): `_ladder` with naive I up to 10 and the chorales' LoRA
    fine-tuning length."""
    return _ladder((1, 2, 5, 10), CHORALES_LORA_EPOCHS)


def _resnet_grid() -> list[EnsembleSpec]:
    """The convolutional ladder (docs/results_mnist_resnet9_cpu.md): `_ladder` with naive I = 1, 2, 5."""
    return _ladder((1, 2, 5))


GRIDS = {"paper": _paper_grid, "readme": _readme_grid, "small": _small_grid, "chorales": _chorales_grid,
         "resnet": _resnet_grid}


def grid_settings(name: str) -> list[EnsembleSpec]:
    """The ensemble settings of a named grid (`paper`, `readme`, `small`, `chorales`, `resnet`)."""
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
                   damping: float | None = None, proj_dim: int = 2048,
                   template: MethodSpec | None = None) -> list[tuple[MethodSpec, EnsembleSpec]]:
    """(method, ensemble) pairs of a sweep: every projection x method x grid setting. `template` carries the
    other method options (projection dtype, dense kind, seed); damping of damped methods: fixed or tuned."""
    template = template or MethodSpec(proj_dim=proj_dim)
    pairs = []
    for proj in projections:
        for name in methods:
            method = dataclasses.replace(template, name=name, proj=proj,
                                         damping=damping if method_record(name).damped else None)
            pairs += [(method, ens) for ens in grid_settings(grid)]
    return pairs


def applicable(task: TaskSpec, pairs: Sequence[tuple[MethodSpec, EnsembleSpec]]) -> list[tuple[MethodSpec, EnsembleSpec]]:
    """The pairs whose ensemble kind can serve the task and method (e.g. no forward-only Dropout for Grad-Dot)."""
    kept = []
    for method, ensemble in pairs:
        try:
            check_setting(task, method, ensemble)
        except UserError:
            continue
        kept.append((method, ensemble))
    return kept


def plan_sweep(task: str | TaskSpec, pairs: Sequence[tuple[MethodSpec, EnsembleSpec]],
               eval_spec: EvalSpec = EvalSpec(), *, store: Store | None = None, device: str = "auto",
               table: str = RESULTS_TABLE, replicates: int = 1, dampings: Sequence[float] = DAMPING_GRID) -> SweepPlan:
    """Count the work of a sweep: pending settings, models to train, member passes, whether each fits.
    Settings the task or method cannot run (see `applicable`) are left out."""
    task, ctx = resolve(task, store, device)
    store, dev = ctx.store, ctx.device
    dataset = load_dataset(task.dataset)
    settings = [(m, e, setting_key(task, m, e, eval_spec, dev, dampings, replicates=replicates))
                for m, e in applicable(task, pairs)]
    existing = store.read_table(table)
    done = set(existing["setting_key"]) if "setting_key" in existing else set()
    gt_missing = missing_models(task, eval_spec, store=store, device=dev, dataset=dataset)
    to_train: set[int] = set()
    passes, problems = 0, []
    for method, ens, key in settings:
        if key in done:
            continue
        for r in range(replicates):
            m_r, e_r = replicate_specs(method, ens, r)
            wp = attribution.plan(task, m_r, e_r, store, device=dev, dampings=list(dampings), dataset=dataset)
            to_train.update(wp.models_to_train)
            passes += len(wp.members)
            if not wp.fits and wp.message not in problems:
                problems.append(wp.message)
    return SweepPlan(task, eval_spec, settings, done, gt_missing, len(to_train), passes, not problems,
                     "; ".join(problems))


def sweep(task: str | TaskSpec, methods: Sequence[str], grid: str = "paper", *,
          projections: Sequence[str] = ("kron",), eval_spec: EvalSpec = EvalSpec(), damping: float | None = None,
          template: MethodSpec | None = None, replicates: int = 1, dampings: Sequence[float] = DAMPING_GRID,
          store: Store | None = None, device: str = "auto", table: str = RESULTS_TABLE,
          progress: Progress | None = None, executor: Executor | str | None = None) -> pd.DataFrame:
    """Run every setting of a grid not yet in the results table (one executor task per setting), appending one
    row per setting as it finishes; only this process appends to the table. Damped methods without a fixed
    damping tune c over `dampings` (part of each row's setting key).

    Returns the rows of all the grid's settings (new and earlier), in grid order.
    """
    task, ctx = resolve(task, store, device, progress, executor)
    store, device = ctx.store, ctx.device
    pairs = sweep_settings(methods, grid, projections, damping, template=template)
    sp = plan_sweep(task, pairs, eval_spec, store=store, device=device, table=table, replicates=replicates,
                    dampings=dampings)
    if not sp.fits:
        raise UserError(sp.message)
    pending = sp.pending
    if pending:
        truth = ground_truth(task, eval_spec, store=store, device=device, progress=progress, executor=ctx.executor)
        dataset = load_dataset(task.dataset)
        if ctx.executor.workers > 1:  # settings running side by side share their base models: train them first
            seeds = {s for m, e, _ in pending for r in range(replicates)
                     for s in base_seeds(replicate_specs(m, e, r)[1])}
            load_or_train(task, sorted(seeds), store=store, device=device, dataset=dataset, progress=progress,
                          executor=ctx.executor)
        finished = []

        def record(i: int, row: dict) -> None:
            store.append_rows(table, [row], unique_by="setting_key")
            finished.append(i)
            report(progress, len(finished), len(pending), "settings")

        ctx.executor.for_each([Task(run_setting, (task, dataset, m, e, eval_spec, truth, replicates,
                                                  tuple(dampings), key)) for m, e, key in pending], ctx, record)
    return results_for(store.read_table(table), [key for _, _, key in sp.settings])


def run_setting(ctx: Context, task: TaskSpec, dataset: Dataset, method: MethodSpec, ensemble: EnsembleSpec,
                eval_spec: EvalSpec, truth: GroundTruth, replicates: int, dampings: Sequence[float],
                key: str) -> dict:
    """Task: one sweep setting (`run`, with everything inside it run where the task runs); its results row.
    Under the setting's lock, so a concurrent sweep waits and then reads the stored scores instead of
    computing them again."""
    remember_dataset(task.dataset, dataset)
    with ctx.store.lock("settings", key):
        return run(task, method, ensemble, eval_spec, store=ctx.store, device=ctx.device, dampings=dampings,
                   truth=truth, replicates=replicates, progress=ctx.progress, executor=ctx.executor).row()
