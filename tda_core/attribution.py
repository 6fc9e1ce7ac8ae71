"""The public attribution API: `plan` (what a run needs) and `attribute` (scores with their costs).

Per member: training-set features (cached in the store, kind ``features``), test-set features
(computed each call), the method's scores; member scores are averaged (TRAK: Q averaged and
applied last). The final matrices are stored too (kind ``scores``), so a repeated call is a
read. `Costs.serve_s` is the cost of the full computation (cached parts at their recorded
seconds), `Costs.serve_now_s` the wall clock of this call.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Sequence

import torch

from .costs import Costs, Ledger
from .data import Dataset, load_dataset
from .device import describe_device, resolve_device
from .ensembles import Member, base_seeds, build_members, mask_averaged_q, member_labels
from .errors import UserError
from .features import (
    DENSE_BLOCK_ENTRIES,
    DenseProjection,
    Features,
    GradientSource,
    KronProjection,
    all_param_names,
    compute_features,
    default_chunk,
    KRON_FORM,
    derive_seed,
    sample_labels,
)
from .methods import DAMPED, MemberAverage, MemberScores, exact_if_scores, fisher_rows, member_scores
from .progress import Progress, report
from .specs import EnsembleSpec, MethodSpec, TaskSpec
from .store import Store, spec_key
from .tasks import get_task
from .training import CHECKPOINT_KIND, checkpoint_key, dataset_fingerprint, init_model, load_or_train

FEATURE_KIND = "features"
SCORE_KIND = "scores"
DEFAULT_DAMPING = 1.0
DENSE_HOLD_FRACTION = 0.5  # hold the whole dense matrix when it takes at most this share of the budget


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


def _differentiated_params(task: TaskSpec, ensemble: EnsembleSpec) -> GradientSource:
    """What a member of this ensemble differentiates, on a fresh model of the task (for sizing)."""
    model = init_model(task, 0).eval()
    if ensemble.kind == "lora" and ensemble.lora_grad == "adapter":
        from peft import get_peft_model

        from .ensembles import lora_config

        model = get_peft_model(model, lora_config(model, ensemble)).eval()
    return GradientSource(model, all_param_names(model), task.sequence)


def feature_dim(source: GradientSource, method: MethodSpec) -> int:
    """Feature dimension k of a member."""
    if method.proj == "none":
        return source.n_params
    return method.proj_dim


def label_sets(method: MethodSpec) -> tuple[int | None, ...]:
    """Training-feature sets per member: at the true labels (None), plus for IF one draw of labels for its Fisher."""
    return (None, 0) if method.name == "if" else (None,)


def estimate_peak_bytes(n_params: int, k: int, n_train: int, n_test: int, method: MethodSpec,
                        n_dampings: int, budget: int) -> int:
    """Rough peak memory of one member's pass (members run one after another)."""
    f = 4
    chunk = min(n_train, default_chunk(n_params)) * n_params * f * 3 if method.proj != "kron" else 0
    proj = 0
    if method.proj == "dense":
        whole = n_params * k * f
        proj = whole if whole <= budget * DENSE_HOLD_FRACTION else DENSE_BLOCK_ENTRIES * f
    feats = (n_train * len(label_sets(method)) + n_test) * k * f
    kernel = min(n_train, k) ** 2 * f * 3
    scores = n_train * n_test * f * (n_dampings + 2)
    exact = 6 * n_test * n_params * f if method.hessian != "fisher" else 0
    return chunk + proj + feats + kernel + scores + exact


def plan(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store: Store | None = None, *,
         device: str | torch.device = "auto", dampings: Sequence[float] | None = None,
         n_test: int | None = None, dataset: Dataset | None = None) -> WorkPlan:
    """Models to train vs stored, members, and the memory / disk estimate with whether it fits."""
    task = get_task(task) if isinstance(task, str) else task
    store = store or Store()
    device = resolve_device(device) if isinstance(device, str) else device
    dataset = dataset or load_dataset(task.dataset)
    seeds = base_seeds(ensemble)
    stored = [s for s in seeds if store.has(CHECKPOINT_KIND, checkpoint_key(task, dataset, s, None, device))]
    source = _differentiated_params(task, ensemble)
    k = feature_dim(source, method)
    n, m = dataset.n_train, n_test if n_test is not None else dataset.n_test
    budget = memory_budget(device)
    n_c = len(set(dampings or []) | {0.0}) if method.name in DAMPED else 1
    peak = estimate_peak_bytes(source.n_params, k, n, m, method, n_c, budget)
    members = member_labels(ensemble)
    disk = len(members) * n * k * 4 * len(label_sets(method))
    store.root.mkdir(parents=True, exist_ok=True)
    disk_free = shutil.disk_usage(store.root).free
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
    for proj, dims in (("dense", (4096, 2048, 1024, 512, 256, 128)), ("kron", (4096, 2048, 1024, 512, 256))):
        for k in dims:
            trial = dataclasses.replace(method, proj=proj, proj_dim=k, hessian="fisher")
            if estimate_peak_bytes(n_params, k, n, m, trial, n_c, budget) <= budget:
                return f"what would fit: --proj {proj} --proj-dim {k} (or set TDA_MEMORY_BUDGET_GB)"
    return "nothing fits this budget: use fewer test examples or set TDA_MEMORY_BUDGET_GB"


# --- attribution --------------------------------------------------------------------------------
def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _projection(member: Member, method: MethodSpec, device: torch.device, dataset: Dataset, budget: int):
    src = member.train_source
    if method.proj == "dense":
        return DenseProjection(src.n_params, method.proj_dim, member.proj_seed, device, method.dense_kind,
                               hold_bytes=int(budget * DENSE_HOLD_FRACTION),
                               dtype=getattr(torch, method.proj_dtype)), None
    if method.proj == "kron":
        return None, KronProjection(src, method.proj_dim, member.proj_seed, device,
                                    (dataset.x_train[:1], dataset.y_train[:1]))
    return None, None


def feature_key(member: Member, method: MethodSpec, device: torch.device, fisher_sample: int | None = None) -> str:
    """Store key of a member's training-set features (at the true labels, or at labels sampled for IF's Fisher)."""
    proj = {"proj": method.proj}
    if method.proj != "none":
        proj.update(dim=method.proj_dim, seed=member.proj_seed)
        if method.proj == "dense":
            proj["dense_kind"] = method.dense_kind
            if method.proj_dtype != "float32":  # keys of float32 features stay as they were
                proj["dtype"] = method.proj_dtype
        if method.proj == "kron":
            proj["kron_form"] = KRON_FORM
    labels = {} if fisher_sample is None else {"labels": {"sampled": fisher_sample, "seed": method.seed}}
    return spec_key({"checkpoint": member.base.key, "variant": member.variant, "projection": proj,
                     "device": device.type, "split": "train", **labels})


def _train_features(member: Member, method: MethodSpec, dataset: Dataset, store: Store, device: torch.device,
                    dense, kron, progress: Progress | None,
                    fisher_sample: int | None = None) -> tuple[Features, float, int, str, bool]:
    """(features, seconds recorded at first computation, bytes, key, loaded) of the training set, cached.
    With `fisher_sample`, at labels drawn from the member's predictive distribution (IF's Fisher)."""
    key = feature_key(member, method, device, fisher_sample)

    def compute():
        t0 = time.perf_counter()
        labels, what = dataset.y_train, "train features"
        if fisher_sample is not None:
            labels = sample_labels(member.train_source, dataset.x_train, dataset.y_train,
                                   derive_seed(method.seed, "fisher", member.proj_seed, fisher_sample), device=device)
            what = "Fisher features (sampled labels)"
        sample_s = time.perf_counter() - t0
        f = compute_features(member.train_source, dataset.x_train, labels, method.proj, dense=dense,
                             kron=kron, device=device, progress=progress, label=f"{what}: {member.description}")
        if fisher_sample is not None:
            f.timings["sample_labels_s"] = sample_s
        return {"phi": f.phi, "p": f.p}, {"timings": f.timings, "member": member.description,
                                           "k": int(f.phi.shape[1])}

    art, loaded = store.get_or_create(FEATURE_KIND, key, compute)
    timings = art.meta["timings"]
    feats = Features(art.tensors["phi"].to(device), art.tensors["p"].to(device), timings)
    return feats, float(sum(timings.values())), art.nbytes, key, loaded


def scheme_identity(method: MethodSpec) -> dict[str, str]:
    """Store-key entries for schemes that changed under the same spec, so older results are never reused."""
    extra = {"kron_form": KRON_FORM} if method.proj == "kron" else {}
    if method.name == "if":
        extra["if_curvature"] = "Fisher from sampled labels; lambda from its trace"
    return extra


def score_key(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, dataset: Dataset,
              dampings: Sequence[float | None], test_pos: torch.Tensor, device: torch.device) -> str:
    """Store key of an attribution's final score matrices."""
    return spec_key({"task": task, "data": dataset_fingerprint(dataset), "method": method, "ensemble": ensemble,
                     "dampings": list(dampings), "test": _digest(test_pos), "device": device.type,
                     **scheme_identity(method)})


def scores_stored(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store: Store | None = None,
                  device: str = "auto") -> bool:
    """True when `attribute` with default dampings on all test examples would just read the store."""
    task = get_task(task) if isinstance(task, str) else task
    dataset = load_dataset(task.dataset)
    c = (method.damping if method.damping is not None else DEFAULT_DAMPING) if method.name in DAMPED else None
    key = score_key(task, method, ensemble, dataset, [c], torch.arange(dataset.n_test), resolve_device(device))
    return (store or Store()).has(SCORE_KIND, key)


def attribute(task: str | TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, *, store: Store | None = None,
              device: str = "auto", dampings: Sequence[float] | None = None, test_positions=None,
              progress: Progress | None = None) -> Attribution:
    """Attribution scores of the ensemble's members, averaged, with their costs.

    `dampings`: extra relative dampings c (TRAK / IF) whose scores come back in
    `scores_by_damping`, computed from the same features (for tuning c on a validation split);
    `scores` uses `method.damping` (None, meaning "tune it", scores with the default c = 1).
    `test_positions`: positions in the test split to score (default all).
    Raises UserError (saying what would fit) when the memory estimate of `plan` exceeds the budget.
    """
    t_call = time.perf_counter()
    task = get_task(task) if isinstance(task, str) else task
    store = store or Store()
    dev = resolve_device(device) if isinstance(device, str) else device
    dataset = load_dataset(task.dataset)
    test_pos = (torch.arange(dataset.n_test) if test_positions is None
                else torch.as_tensor(test_positions, dtype=torch.long).reshape(-1))
    if len(test_pos) and (int(test_pos.min()) < 0 or int(test_pos.max()) >= dataset.n_test):
        raise UserError(f"test positions must lie in 0..{dataset.n_test - 1}")
    damped = method.name in DAMPED
    c_main = (method.damping if method.damping is not None else DEFAULT_DAMPING) if damped else None
    cs = sorted({float(c) for c in (dampings or [])} | {c_main}) if damped else [None]
    if damped and any(c < 0 for c in cs):
        raise UserError("dampings must be >= 0")
    wp = plan(task, method, ensemble, store, device=dev, dampings=[c for c in cs if c is not None],
              n_test=len(test_pos), dataset=dataset)
    if not wp.fits:
        raise UserError(wp.message)
    key = score_key(task, method, ensemble, dataset, cs, test_pos, dev)
    train_index, test_index = dataset.train_index.clone(), dataset.test_index[test_pos].clone()
    found = store.load(SCORE_KIND, key)
    if found is not None:
        costs = Costs(**{**found.meta["costs"], "serve_now_s": time.perf_counter() - t_call, "from_store": True})
        by = {c: found.tensors["scores" if c == c_main else f"c={c}"] for c in cs if c is not None}
        return Attribution(task, method, ensemble, found.tensors["scores"], by, c_main, costs,
                           found.meta["members"], train_index, test_index, key)

    ledger = Ledger()
    bases = load_or_train(task, base_seeds(ensemble), store=store, device=dev, dataset=dataset, progress=progress)
    t_serve = time.perf_counter()
    ledger.add({"base_train_s": sum(b.train_s for b in bases), "load_s": sum(b.load_s for b in bases)})
    x_test, y_test = dataset.x_test[test_pos], dataset.y_test[test_pos]
    average, members, feature_bytes = MemberAverage(), [], {}
    serve_full, finetune_now = 0.0, 0.0
    space = sum(b.nbytes for b in bases)
    budget = memory_budget(dev)
    for i, member in enumerate(build_members(task, ensemble, method, bases, dataset, store, dev, test_pos)):
        t_member = time.perf_counter()
        members.append(member.description)
        ledger.add({"finetune_s": member.finetune_s})
        finetune_now += member.finetune_now_s
        space += member.adapter_bytes
        dense, kron = _projection(member, method, dev, dataset, budget)
        train_sets, cached_s = {}, 0.0
        for sample in label_sets(method):
            feats, recorded_s, nbytes, fkey, loaded = _train_features(member, method, dataset, store, dev, dense,
                                                                      kron, progress, sample)
            feature_bytes[fkey] = nbytes
            train_sets[sample] = feats
            if loaded:  # served from the store: its seconds as recorded when first computed
                ledger.add({"cached_train_features_s": recorded_s})
                cached_s += recorded_s
            else:
                ledger.add(feats.timings)
        train_f, curvature_f = train_sets[None], train_sets.get(0)
        test_f = compute_features(member.test_source, x_test, y_test, method.proj, dense=dense, kron=kron,
                                  device=dev, label=f"test features: {member.description}")
        ledger.add(test_f.timings)
        q = None
        if member.q_masks is not None and not task.sequence:
            with ledger.time("q_s"):
                q = mask_averaged_q(member.train_source.model, member.q_masks, dataset.x_train,
                                    dataset.y_train, dev)
        if method.hessian != "fisher":
            t0 = time.perf_counter()
            psi = fisher_rows(curvature_f)
            by, _ = exact_if_scores(member.train_source, dataset.x_train.to(dev), dataset.y_train.to(dev),
                                    train_f.phi, train_f.p, test_f.phi, cs, float((psi * psi).sum(1).mean()),
                                    curvature=method.hessian)
            scored = MemberScores(by, None, time.perf_counter() - t0)
        else:
            scored = member_scores(method, train_f, test_f, cs, q, curvature_f)
        average.add(scored)
        ledger.add({"solve_s": scored.solve_s})
        now_s = time.perf_counter() - t_member
        # full cost: this member's work now, with cached train features at their recorded seconds
        # (a dense matrix regenerated only for the test side is not part of the full computation)
        serve_full += now_s + (cached_s - test_f.timings.get("gen_s", 0.0) if cached_s else 0.0)
        report(progress, i + 1, ensemble.n_members, "members")
    with ledger.time("combine_s"):
        result = {c: s.float().cpu() for c, s in average.result().items()}
    serve_full += ledger.seconds["combine_s"]
    space += sum(feature_bytes.values())
    breakdown = dict(ledger.seconds)
    costs = Costs(train_s=breakdown.get("base_train_s", 0.0) + breakdown.get("finetune_s", 0.0),
                  serve_s=serve_full, space_bytes=int(space), n_trained=ensemble.n_trained,
                  n_members=len(members), device=describe_device(dev), breakdown=breakdown,
                  serve_now_s=time.perf_counter() - t_serve - finetune_now, from_store=False)
    tensors = {"scores": result[c_main]} | {f"c={c}": result[c] for c in cs if c is not None and c != c_main}
    store.save(SCORE_KIND, key, tensors, {"costs": costs.to_dict(), "members": members, "task": task.name,
                                          "method": method.name, "ensemble": ensemble.kind, "damping": c_main})
    by = {c: result[c] for c in cs if c is not None}
    return Attribution(task, method, ensemble, result[c_main], by, c_main, costs, members, train_index,
                       test_index, key)
