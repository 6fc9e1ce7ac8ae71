"""The public attribution API: `plan` (what a run needs) and `attribute` (scores with their costs).

Per member: training-set features (cached in the store, kind ``features``), test-set features
(computed each call), the method's scores; member scores are averaged (TRAK: Q averaged and
applied last). The final matrices are stored too (kind ``scores``), so a repeated call is a
read. `Costs.serve_s` is the cost of the full computation (cached parts at their recorded
seconds), `Costs.serve_now_s` the wall clock of this call. Every score matrix is train x test.

`attribute` runs in named steps: `_request` (validate, plan, key), `_stored_attribution`, then per
member `_score_member` (projection, features, forward-only Q, the method's scorer), and `_finish`
(average, costs from the ledger, save). Nothing here branches on a method, projection or ensemble
name: it reads their registries (methods.py, projections.py, ensembles.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence

import torch

from .context import Context, resolve
from .costs import Costs, Ledger
from .data import Dataset, load_dataset
from .device import describe_device
from .ensembles import (Member, MemberContext, base_seeds, build_member, build_members, check_setting,
                        differentiated_model, member_labels, members_per_model, needs_preparing, prepare_member)
from .executors import Executor, Task, in_order
from .errors import UserError
from .features import Features, GradientSource, all_param_names, compute_features, derive_seed, sample_labels
from .methods import MemberAverage, MemberScores, kernel_identity, member_scores
from .progress import Progress, report
from .projections import FeatureMap, reuse_dense_matrix
from .specs import EnsembleSpec, MethodSpec, TaskSpec, method_record, projection_class
from .store import Store, spec_key
from .training import CHECKPOINT_KIND, TrainedModel, checkpoint_key, dataset_fingerprint, init_model, load_or_train

FEATURE_KIND = "features"
TEST_FEATURE_KIND = "test_features"
SCORE_KIND = "scores"
DEFAULT_DAMPING = 1.0


@dataclasses.dataclass
class Attribution:
    """Scores [n_train, n_test] (higher = more helpful) with what produced them and what they cost."""

    task: TaskSpec
    method: MethodSpec
    ensemble: EnsembleSpec
    scores: torch.Tensor
    scores_by_damping: dict[float, torch.Tensor]
    damping: float | None
    costs: Costs
    members: list[str]
    train_index: torch.Tensor
    test_index: torch.Tensor
    key: str
    uncovered: list[str] = dataclasses.field(default_factory=list)  # parameters the projection left out

    def top(self, column: int, k: int = 5) -> list[int]:
        """Source indices of the k most helpful training examples for test column `column`."""
        order = torch.argsort(self.scores[:, column], descending=True)[:k]
        return self.train_index[order].tolist()


# --- planning -----------------------------------------------------------------------------------
@dataclasses.dataclass
class WorkPlan:
    """What `attribute` will do and whether it fits: shown before a run."""

    task: str
    models_stored: list[int]
    models_to_train: list[int]
    members: list[str]
    n_params: int
    feature_dim: int
    peak_bytes: int
    budget_bytes: int
    disk_bytes: int
    disk_free_bytes: int
    fits: bool
    message: str

    def describe(self) -> str:
        gb = 1 << 30
        return (f"{self.task}: {len(self.models_to_train)} model(s) to train, {len(self.models_stored)} stored; "
                f"{len(self.members)} member(s); {self.n_params:,} parameters -> {self.feature_dim:,} features; "
                f"peak memory ~{self.peak_bytes / gb:.2f} GB of {self.budget_bytes / gb:.2f} GB; "
                f"feature cache ~{self.disk_bytes / gb:.2f} GB")


def memory_budget(device: torch.device) -> int:
    """Bytes a run may use: $TDA_MEMORY_BUDGET_GB, else 80% of free CUDA memory or 60% of available RAM."""
    if os.environ.get("TDA_MEMORY_BUDGET_GB"):
        return int(float(os.environ["TDA_MEMORY_BUDGET_GB"]) * (1 << 30))
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.8)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info["MemAvailable"] * 0.6)
    except (OSError, KeyError, ValueError):
        return 8 << 30


def _sizing_source(task: TaskSpec, ensemble: EnsembleSpec) -> GradientSource:
    """What a member of this ensemble differentiates, on a fresh model of the task (for sizing)."""
    model = differentiated_model(init_model(task, 0).eval(), ensemble)
    return GradientSource(model, all_param_names(model), task.sequence)


def feature_dim(source: GradientSource, method: MethodSpec) -> int:
    """Feature dimension k of a member."""
    return projection_class(method.proj).feature_dim(source.n_params, method)


def label_sets(method: MethodSpec) -> tuple[int | None, ...]:
    """Training-feature sets per member: at the true labels (None), plus the method's draws of sampled labels."""
    return (None, *range(method_record(method.name).curvature_draws))


def estimate_peak_bytes(n_params: int, k: int, n_train: int, n_test: int, method: MethodSpec,
                        n_dampings: int, budget: int) -> int:
    """Rough peak memory of one member's pass (members run one after another)."""
    f = 4
    projection = projection_class(method.proj).peak_bytes(n_params, k, n_train, budget)
    feats = (n_train * len(label_sets(method)) + n_test) * k * f
    side = min(n_train, k)
    kernel = 3 * side ** 2 * f  # the kernel, then one damped system and its factor at a time
    scores = n_train * n_test * f * (2 * n_dampings + 2)  # one product for every c, then the running sums
    exact = 6 * n_test * n_params * f if method.hessian != "fisher" else 0
    return projection + feats + kernel + scores + exact


def _n_dampings(method: MethodSpec, dampings: Sequence[float] | None) -> int:
    return len(set(dampings or []) | {0.0}) if method_record(method.name).damped else 1


def plan(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store: Store | None = None, *,
         device: str | torch.device = "auto", dampings: Sequence[float] | None = None,
         n_test: int | None = None, dataset: Dataset | None = None) -> WorkPlan:
    """Models to train vs stored, members, and the memory / disk estimate with whether it fits."""
    task, ctx = resolve(task, store, device)
    check_setting(task, method, ensemble)
    dataset = dataset or load_dataset(task.dataset)
    seeds = base_seeds(ensemble)
    stored = [s for s in seeds
              if ctx.store.has(CHECKPOINT_KIND, checkpoint_key(task, dataset, s, None, ctx.device))]
    source = _sizing_source(task, ensemble)
    k = feature_dim(source, method)
    n, m = dataset.n_train, n_test if n_test is not None else dataset.n_test
    budget = memory_budget(ctx.device)
    n_c = _n_dampings(method, dampings)
    peak = estimate_peak_bytes(source.n_params, k, n, m, method, n_c, budget)
    members = member_labels(ensemble)
    disk = len(members) * n * k * 4 * len(label_sets(method))
    ctx.store.root.mkdir(parents=True, exist_ok=True)
    disk_free = shutil.disk_usage(ctx.store.root).free
    problems = []
    if peak > budget:
        hint = _what_fits(source.n_params, n, m, method, n_c, budget)
        problems.append(f"{method.proj} features need ~{peak / 2**30:.2f} GB at peak but the memory budget is "
                        f"{budget / 2**30:.2f} GB ({source.n_params:,} parameters, k={k:,}); {hint}")
    if disk > disk_free:
        per = n * k * 4
        problems.append(f"{len(members)} members cache ~{disk / 2**30:.2f} GB of features but only "
                        f"{disk_free / 2**30:.2f} GB is free; at most {disk_free // max(per, 1)} members fit")
    return WorkPlan(task.name, stored, [s for s in seeds if s not in stored], members, source.n_params, k, peak,
                    budget, disk, disk_free, not problems, "; ".join(problems) or "fits")


def _what_fits(n_params: int, n: int, m: int, method: MethodSpec, n_c: int, budget: int) -> str:
    from .projections import PROJECTIONS

    for proj in PROJECTIONS:
        for k in (4096, 2048, 1024, 512, 256, 128):
            trial = dataclasses.replace(method, proj=proj, proj_dim=k, hessian="fisher")
            k_trial = projection_class(proj).feature_dim(n_params, trial)
            if estimate_peak_bytes(n_params, k_trial, n, m, trial, n_c, budget) <= budget:
                return f"what would fit: --proj {proj} --proj-dim {k} (or set TDA_MEMORY_BUDGET_GB)"
    return "nothing fits this budget: use fewer test examples or set TDA_MEMORY_BUDGET_GB"


# --- store keys ---------------------------------------------------------------------------------
def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def feature_key(member: Member, method: MethodSpec, device: torch.device, fisher_sample: int | None = None,
                test_pos: torch.Tensor | None = None) -> str:
    """Store key of a member's training-set features (at the true labels, or at labels sampled for IF's Fisher),
    or with `test_pos` of its features at those test positions."""
    labels = {} if fisher_sample is None else {"labels": {"sampled": fisher_sample, "seed": method.seed}}
    projection = projection_class(method.proj)
    identity = projection.identity(method, member.proj_seed) | projection.model_scheme(member.train_source)
    split = {"split": "train"} if test_pos is None else {"split": "test", "test": _digest(test_pos)}
    return spec_key({"checkpoint": member.base.key, "variant": member.variant, "projection": identity,
                     "device": device.type, **split, **labels})


def scheme_identity(method: MethodSpec, device: torch.device, source: GradientSource | None = None
                    ) -> dict[str, str]:
    """Store-key entries for schemes that changed under the same spec, so older results are never reused: the
    projection's, the method's and the kernel arithmetic's on `device`; with `source` (what members
    differentiate), also the projection's entries for that model."""
    projection = projection_class(method.proj)
    model = projection.model_scheme(source) if source is not None else {}
    return {**projection.scheme, **method_record(method.name).scheme, **model, **kernel_identity(method, device)}


def score_key(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, dataset: Dataset,
              dampings: Sequence[float | None], test_pos: torch.Tensor, device: torch.device) -> str:
    """Store key of an attribution's final score matrices."""
    return spec_key({"task": task, "data": dataset_fingerprint(dataset), "method": method, "ensemble": ensemble,
                     "dampings": list(dampings), "test": _digest(test_pos), "device": device.type,
                     **scheme_identity(method, device, _sizing_source(task, ensemble))})


def main_damping(method: MethodSpec) -> float | None:
    """The damping c of `Attribution.scores`: the spec's (None, "tune it", scores with the default c = 1);
    None for undamped methods."""
    if not method_record(method.name).damped:
        return None
    return method.damping if method.damping is not None else DEFAULT_DAMPING


def scores_stored(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store: Store | None = None,
                  device: str = "auto") -> bool:
    """True when `attribute` with default dampings on all test examples would just read the store."""
    task, ctx = resolve(task, store, device)
    dataset = load_dataset(task.dataset)
    key = score_key(task, method, ensemble, dataset, [main_damping(method)], torch.arange(dataset.n_test), ctx.device)
    return ctx.store.has(SCORE_KIND, key)


# --- attribution --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Request:
    """A validated attribution request: what to score, on which test positions, at which dampings."""

    task: TaskSpec
    method: MethodSpec
    ensemble: EnsembleSpec
    dataset: Dataset
    test_pos: torch.Tensor
    dampings: list[float | None]  # sorted; [None] for undamped methods
    main: float | None  # the damping of `Attribution.scores`
    key: str


def _request(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, ctx: Context,
             dampings: Sequence[float] | None, test_positions) -> _Request:  # noqa: ANN001
    """Validate the request, check that its plan fits, and key it."""
    check_setting(task, method, ensemble)
    dataset = load_dataset(task.dataset)
    test_pos = (torch.arange(dataset.n_test) if test_positions is None
                else torch.as_tensor(test_positions, dtype=torch.long).reshape(-1))
    if len(test_pos) and (int(test_pos.min()) < 0 or int(test_pos.max()) >= dataset.n_test):
        raise UserError(f"test positions must lie in 0..{dataset.n_test - 1}")
    c_main = main_damping(method)
    cs: list[float | None] = [None] if c_main is None else sorted({float(c) for c in (dampings or [])} | {c_main})
    if c_main is not None and any(c < 0 for c in cs):
        raise UserError("dampings must be >= 0")
    wp = plan(task, method, ensemble, ctx.store, device=ctx.device, dampings=[c for c in cs if c is not None],
              n_test=len(test_pos), dataset=dataset)
    if not wp.fits:
        raise UserError(wp.message)
    return _Request(task, method, ensemble, dataset, test_pos, cs, c_main,
                    score_key(task, method, ensemble, dataset, cs, test_pos, ctx.device))


def _attribution(request: _Request, by: dict[float | None, torch.Tensor], costs: Costs,
                 members: list[str], uncovered: list[str]) -> Attribution:
    damped = {c: s for c, s in by.items() if c is not None}
    return Attribution(request.task, request.method, request.ensemble, by[request.main], damped, request.main,
                       costs, members, request.dataset.train_index.clone(),
                       request.dataset.test_index[request.test_pos].clone(), request.key, uncovered)


def _stored_attribution(request: _Request, ctx: Context, t_call: float) -> Attribution | None:
    """The request's result when the store holds it (a read, with this call's wall clock)."""
    found = ctx.store.load(SCORE_KIND, request.key)
    if found is None:
        return None
    costs = Costs(**{**found.meta["costs"], "serve_now_s": time.perf_counter() - t_call, "from_store": True})
    by = {c: found.tensors["scores" if c == request.main else f"c={c}"] for c in request.dampings}
    return _attribution(request, by, costs, found.meta["members"], found.meta.get("uncovered", []))


def _features(member: Member, method: MethodSpec, dataset: Dataset, ctx: Context, ledger: Ledger,
              feature_map: Callable[[], tuple[FeatureMap, float]], fisher_sample: int | None = None,
              test_pos: torch.Tensor | None = None, with_train: bool = False) -> tuple[Features, dict, int, str, bool]:
    """(features, metadata as recorded at first computation, bytes, key, loaded) of one split, cached: the
    training set (`test_pos` None; with `fisher_sample`, at labels drawn from the member's predictive
    distribution, IF's Fisher) or the test positions `test_pos` (`with_train`: computed in the same call as the
    member's training-set features, so a held projection matrix was not generated again for them).
    `feature_map()` gives the member's feature map and the seconds its building took now (0 once built), which
    are recorded with these features as `setup_s`. The seconds spent reading or writing them in the store go to
    `ledger` as `store_s`."""
    kind = FEATURE_KIND if test_pos is None else TEST_FEATURE_KIND
    key = feature_key(member, method, ctx.device, fisher_sample, test_pos)

    compute_s: list[float] = []  # seconds of the computation, when it ran

    def compute():
        t0 = time.perf_counter()
        if test_pos is not None:
            source, x, labels = member.test_source, dataset.x_test[test_pos], dataset.y_test[test_pos]
            what = "test features"
        else:
            source, x, labels, what = member.train_source, dataset.x_train, dataset.y_train, "train features"
        if fisher_sample is not None:
            labels = sample_labels(source, x, labels, derive_seed(method.seed, "fisher", member.proj_seed,
                                                                 fisher_sample), device=ctx.device)
            what = "Fisher features (sampled labels)"
        sample_s = time.perf_counter() - t0
        fmap, setup_s = feature_map()
        f = compute_features(source, x, labels, fmap, device=ctx.device, progress=ctx.progress,
                             label=f"{what}: {member.description}")
        f.timings["setup_s"] = setup_s
        if fisher_sample is not None:
            f.timings["sample_labels_s"] = sample_s
        meta = {"timings": f.timings, "member": member.description, "k": int(f.phi.shape[1]),
                "uncovered": list(fmap.uncovered)}
        compute_s.append(time.perf_counter() - t0)
        return {"phi": f.phi, "p": f.p}, meta | ({"with_train": with_train} if test_pos is not None else {})

    t0 = time.perf_counter()
    art, loaded = ctx.store.get_or_create(kind, key, compute)
    ledger.add({"store_s": time.perf_counter() - t0 - sum(compute_s)})
    feats = Features(art.tensors["phi"].to(ctx.device), art.tensors["p"].to(ctx.device), art.meta["timings"])
    return feats, art.meta, art.nbytes, key, loaded


def _score_member(member: Member, request: _Request, ctx: Context, ledger: Ledger,
                  feature_bytes: dict[str, int], uncovered: dict[str, None]) -> MemberScores:
    """One member's scores: its feature map, training features per label set and test features (both cached),
    the forward-only Q where the method uses one, and the method's scorer. Costs go to `ledger`, the names of
    parameters its projection leaves out to `uncovered`."""
    t_member = time.perf_counter()
    method, dataset, dev = request.method, request.dataset, ctx.device
    ledger.add({"finetune_s": member.finetune_s})
    ledger.space_bytes += member.adapter_bytes
    built: list[FeatureMap] = []

    def feature_map() -> tuple[FeatureMap, float]:  # built only when some features are not in the store
        if built:
            return built[0], 0.0
        t0 = time.perf_counter()
        built.append(projection_class(method.proj).build(member.train_source, method, member.proj_seed, dev,
                                                         (dataset.x_train[:1], dataset.y_train[:1]),
                                                         memory_budget(dev)))
        return built[0], time.perf_counter() - t0

    train_sets, cached_s, computed = {}, 0.0, False
    for sample in label_sets(method):
        feats, meta, nbytes, fkey, loaded = _features(member, method, dataset, ctx, ledger, feature_map, sample)
        feature_bytes[fkey] = nbytes
        uncovered.update(dict.fromkeys(meta.get("uncovered", [])))
        train_sets[sample] = feats
        cached_s += _count(ledger, feats.timings, loaded, "cached_train_features_s")
        computed |= not loaded
    test_f, meta, _, _, loaded = _features(member, method, dataset, ctx, ledger, feature_map, None,
                                            request.test_pos, computed)
    cached_s += _count(ledger, test_f.timings, loaded, "cached_test_features_s")
    # a feature map built (a projection matrix generated) again for the test side alone is not part of the full
    # computation, which builds it once for both sides
    again = ("setup_s", "gen_s")
    regenerated_s = 0.0 if meta["with_train"] else sum(test_f.timings.get(name, 0.0) for name in again)
    q = None
    if member.forward_q is not None and method_record(method.name).uses_q:
        with ledger.time("q_s"):
            q = member.forward_q(dataset, dev)
    scored = member_scores(method, train_sets[None], test_f, request.dampings, q, train_sets.get(0),
                           source=member.train_source, x_train=dataset.x_train.to(dev),
                           y_train=dataset.y_train.to(dev))
    ledger.add(scored.timings)
    # full cost: this member's work now, with cached features at their recorded seconds
    ledger.serve_s += time.perf_counter() - t_member + cached_s - regenerated_s
    return scored


def _count(ledger: Ledger, timings: dict[str, float], loaded: bool, cached_name: str) -> float:
    """Put a feature set's seconds in the ledger; returns them when they were read from the store (served from
    the cache: counted at their recorded seconds), else 0 (computed now: inside the member's wall clock)."""
    if not loaded:
        ledger.add(timings)
        return 0.0
    recorded = float(sum(timings.values()))
    ledger.add({cached_name: recorded})
    return recorded


def attribute(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, *, store: Store | None = None,
              device: str = "auto", dampings: Sequence[float] | None = None, test_positions=None,
              progress: Progress | None = None, executor: Executor | str | None = None) -> Attribution:
    """Attribution scores [n_train, n_test] of the ensemble's members, averaged, with their costs.

    `dampings`: extra relative dampings c (TRAK / IF) whose scores come back in
    `scores_by_damping`, computed from the same features (for tuning c on a validation split);
    `scores` uses `method.damping` (None, meaning "tune it", scores with the default c = 1).
    `test_positions`: positions in the test split to score (default all).
    `executor`: where base models, adapter fine-tunes and members run (tda_core/executors.py; default local).
    Raises UserError (saying what would fit) when the memory estimate of `plan` exceeds the budget.
    """
    t_call = time.perf_counter()
    task, ctx = resolve(task, store, device, progress, executor)
    request = _request(task, method, ensemble, ctx, dampings, test_positions)
    stored = _stored_attribution(request, ctx, t_call)
    if stored is not None:
        return stored
    ledger = Ledger()
    bases = load_or_train(task, base_seeds(ensemble), store=ctx.store, device=ctx.device, dataset=request.dataset,
                          progress=ctx.progress, executor=ctx.executor)
    ledger.add({"base_train_s": sum(b.train_s for b in bases), "load_s": sum(b.load_s for b in bases)})
    ledger.space_bytes += sum(b.nbytes for b in bases)
    jobs = [(base, j) for base in bases for j in range(members_per_model(ensemble))]
    if needs_preparing(ensemble):  # LoRA adapters: fine-tuned (or found stored) before members are built
        ctx.executor.for_each([Task(prepare_member_task, (request, base, j)) for base, j in jobs], ctx,
                              lambda i, _: report(ctx.progress, i + 1, len(jobs), "fine-tunes"))
    t_serve = time.perf_counter()
    average, members, feature_bytes, uncovered, finetune_now = MemberAverage(), [], {}, {}, []

    def add(i: int, done: ScoredMember) -> None:
        members.append(done.description)
        finetune_now.append(done.finetune_now_s)
        ledger.merge(done.ledger)
        feature_bytes.update(done.feature_bytes)
        uncovered.update(dict.fromkeys(done.uncovered))
        average.add(done.scores)
        report(ctx.progress, i + 1, ensemble.n_members, "members")

    with reuse_dense_matrix():  # members sharing a projection seed (run here) generate its dense matrix once
        ctx.executor.for_each([Task(score_member_task, (request, base, j)) for base, j in jobs], ctx, in_order(add))
    return _finish(request, ctx, ledger, average, members, feature_bytes, list(uncovered),
                   t_serve + sum(finetune_now), t_call)


@dataclasses.dataclass
class ScoredMember:
    """What a member's task hands back: its scores, what it cost, the bytes of the features it cached and the
    parameters its projection leaves out."""

    scores: MemberScores
    ledger: Ledger
    description: str
    feature_bytes: dict[str, int]
    finetune_now_s: float
    uncovered: list[str]


def _member_context(request: _Request, ctx: Context) -> MemberContext:
    return MemberContext(request.task, request.ensemble, request.method, request.dataset, ctx.store, ctx.device,
                         request.test_pos)


def prepare_member_task(ctx: Context, request: _Request, base: TrainedModel, j: int) -> None:
    """Task: the ensemble kind's stored work for member j of `base` (a LoRA fine-tune)."""
    prepare_member(_member_context(request, ctx), base, j)


def score_member_task(ctx: Context, request: _Request, base: TrainedModel, j: int) -> ScoredMember:
    """Task: member j of `base`, built, featurized (training features cached in the store) and scored."""
    member = build_member(_member_context(request, ctx), base, j)
    ledger, feature_bytes, uncovered = Ledger(), {}, {}
    scores = _score_member(member, request, ctx, ledger, feature_bytes, uncovered)
    return ScoredMember(scores, ledger, member.description, feature_bytes, member.finetune_now_s, list(uncovered))


def _finish(request: _Request, ctx: Context, ledger: Ledger, average: MemberAverage, members: list[str],
            feature_bytes: dict[str, int], uncovered: list[str], t_serve: float, t_call: float) -> Attribution:
    """Average the members, close the costs and save the score matrices (`t_serve`: when serving started,
    moved later by the seconds spent fine-tuning; `t_call`: when the call started, for its wall clock)."""
    with ledger.time("combine_s"):
        result = {c: s.float().cpu() for c, s in average.result().items()}
    ledger.serve_s += ledger.seconds["combine_s"]
    ledger.space_bytes += sum(feature_bytes.values())
    now = time.perf_counter()
    costs = ledger.costs(request.ensemble.n_trained, len(members), describe_device(ctx.device), now - t_serve,
                         now - t_call, ctx.executor.workers)
    tensors = {"scores": result[request.main]} | {f"c={c}": s for c, s in result.items()
                                                   if c is not None and c != request.main}
    ctx.store.save(SCORE_KIND, request.key, tensors,
                   {"costs": costs.to_dict(), "members": members, "task": request.task.name,
                    "method": request.method.name, "ensemble": request.ensemble.kind, "damping": request.main,
                    "uncovered": uncovered})
    return _attribution(request, result, costs, members, uncovered)



# --- each member's own scores (teaching views) ---------------------------------------------------------
MEMBER_KIND = "member_scores"


@dataclasses.dataclass
class MemberAttribution:
    """Each member's scores [members, n_train, n_test] at the main damping, before TRAK's Q, and each member's Q
    [members, n_train] (None for methods without one): what `attribute` averages."""

    labels: list[str]
    scores: torch.Tensor
    q: torch.Tensor | None
    damping: float | None
    key: str

    def member(self, j: int) -> torch.Tensor:
        """Member j alone as an attribution (its scores times its own Q)."""
        return self.scores[j] * (self.q[j][:, None] if self.q is not None else 1.0)

    def average(self, n: int | None = None) -> torch.Tensor:
        """The ensemble of the first n members as `attribute` computes it: mean scores times mean Q."""
        n = len(self.labels) if n is None else n
        if not 1 <= n <= len(self.labels):
            raise UserError(f"choose 1..{len(self.labels)} members, got {n}")
        average = MemberAverage()
        for j in range(n):
            average.add(MemberScores({self.damping: self.scores[j]}, None if self.q is None else self.q[j], 0.0))
        return average.result()[self.damping]


def _members_key(request: _Request) -> str:
    return spec_key({"members of": request.key})


def members_stored(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store: Store | None = None,
                   device: str = "auto") -> bool:
    """True when `member_attribution` would just read the store."""
    task, ctx = resolve(task, store, device)
    dataset = load_dataset(task.dataset)
    key = score_key(task, method, ensemble, dataset, [main_damping(method)], torch.arange(dataset.n_test), ctx.device)
    return ctx.store.has(MEMBER_KIND, spec_key({"members of": key}))


def member_attribution(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, *,
                       store: Store | None = None, device: str = "auto",
                       progress: Progress | None = None) -> MemberAttribution:
    """Every member's own scores on all test examples (stored; training features come from the feature cache),
    so views can show how members agree and how the ensemble's ranking forms as members are added."""
    task, ctx = resolve(task, store, device, progress)
    request = _request(task, method, ensemble, ctx, None, None)
    key = _members_key(request)
    found = ctx.store.load(MEMBER_KIND, key)
    if found is None:
        bases = load_or_train(task, base_seeds(ensemble), store=ctx.store, device=ctx.device,
                              dataset=request.dataset, progress=ctx.progress)
        labels, scores, qs = [], [], []
        for i, member in enumerate(build_members(task, ensemble, method, bases, request.dataset, ctx.store,
                                                 ctx.device, request.test_pos)):
            scored = _score_member(member, request, ctx, Ledger(), {}, {})
            labels.append(member.description)
            scores.append(scored.by_damping[request.main].float().cpu())
            qs.append(None if scored.q is None else scored.q.float().cpu())
            report(ctx.progress, i + 1, ensemble.n_members, "member scores")
        tensors = {"scores": torch.stack(scores)} | ({} if qs[0] is None else {"q": torch.stack(qs)})
        found = ctx.store.save(MEMBER_KIND, key, tensors, {"members": labels, "damping": request.main,
                                                           "task": task.name, "scores": request.key})
    return MemberAttribution(found.meta["members"], found.tensors["scores"], found.tensors.get("q"),
                             found.meta["damping"], key)
