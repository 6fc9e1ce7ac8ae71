"""TRAK, IF, Grad-Dot and Grad-Cos from one member's features, and member averaging.

Every score matrix is [n_train, n_test], higher = more helpful (training on the example
raises the test target). With phi the target-gradient features and w = 1 - p
(classification) or 1 (sequences), the training-loss gradient is ``-w * phi``, so:
- Grad-Dot  = w_i phi_i . phi_t;     Grad-Cos = cos(phi_i, phi_t);
- TRAK      = phi_i^T (Phi^T Phi + lambda I)^-1 phi_t, times Q_i = w_i averaged over members;
- IF        = w_i phi_i^T (H + lambda I)^-1 phi_t with H = Psi^T Psi / n the Fisher in feature
              space: Psi's rows are loss-gradient features at labels drawn from the model itself,
              whose expected outer product is the Gauss-Newton matrix (the empirical Fisher, at the
              true labels, is not: measured rank correlation with the exact-Hessian IF 0.81 vs 0.93);
- IF by CG  = the same with H the full-parameter Gauss-Newton matrix or the exact Hessian, solved
              by conjugate gradient (`exact_if_scores`, small models only; references for the tests).
Damping is relative: lambda = c * trace(kernel) / min(n, k), the mean non-zero eigenvalue of the
kernel (k = feature dimension, n = training examples). With k <= n, as for every projected run
on MNIST, this is the usual trace / k; for exact gradients (k >> n) it keeps c on the same scale.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from .features import Features, GradientSource
from .objectives import per_example_loss
from .registry import Registry
from .specs import MethodSpec, projection_class
from .timing import timed


def weight_of(p: torch.Tensor) -> torch.Tensor:
    """w with grad loss = -w * grad target: 1 - p (classification) or 1 (sequences, p is NaN)."""
    return torch.where(torch.isnan(p), torch.ones_like(p), 1.0 - p)


def loss_weight(features: Features) -> torch.Tensor:
    """`weight_of` the features' p."""
    return weight_of(features.p)


KERNEL_DTYPES = ("float32", "bfloat16")


def kernel_dtype(method: MethodSpec, device: torch.device | str) -> str:
    """Precision of the kernel and score products of projected features: 'bfloat16' (bfloat16 products summed
    in float32 by oneDNN; solves stay float32) with the default `proj_dtype` on a CPU, else 'float32' (also for
    exact gradients, the reference path)."""
    projected = not projection_class(method.proj).exact
    cpu = torch.device(device).type == "cpu"
    return "bfloat16" if method.proj_dtype == "bfloat16" and projected and cpu else "float32"


def kernel_identity(method: MethodSpec, device: torch.device | str) -> dict[str, str]:
    """Store-key entry of a damped method's kernel precision (none for float32: those keys stay as they were)."""
    if not METHODS.get(method.name).damped or kernel_dtype(method, device) == "float32":
        return {}
    return {"kernel_dtype": "bfloat16 products, float32 sums and solves"}


@contextmanager
def _products_in(dtype: str) -> Iterator[None]:
    """Float32 matrix products inside run with bfloat16 products and float32 accumulation and results (oneDNN's
    bf16 math mode, a process-wide setting restored on exit) when `dtype` is 'bfloat16'; a no-op for 'float32'.
    On CPUs oneDNN cannot run in bfloat16 the products stay float32."""
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"kernel dtype must be one of {KERNEL_DTYPES}, got {dtype!r}")
    if dtype == "float32":
        yield
        return
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


def _pseudo_inverse_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b by a float64 eigen-solve (pseudo-inverse): the fallback when a Cholesky fails."""
    evals, evecs = torch.linalg.eigh(a.double())
    inv = torch.where(evals > evals.max() * 1e-10, 1.0 / evals, torch.zeros_like(evals))
    return (evecs @ (inv[:, None] * (evecs.T @ b.double()))).to(b.dtype)


def gram_matrix(a: torch.Tensor, b: torch.Tensor | None = None, dtype: str = "float32") -> torch.Tensor:
    """a^T b (b = a: the kernel Phi^T Phi), float32, with products in `dtype`."""
    with _products_in(dtype):
        return a.T @ (a if b is None else b)


def damped_solves(gram: torch.Tensor, rhs: torch.Tensor, lams: Mapping[float, float]) -> dict[float, torch.Tensor]:
    """For each c: (gram + lams[c] I)^-1 rhs, by one float32 Cholesky factorisation per c, one c after another
    (a float64 pseudo-inverse for a c whose factorisation fails).

    One factorisation per c is the cheapest exact form for a grid of a few values: an eigendecomposition of
    the kernel, reusable for every c, costs about ten Cholesky factorisations on a CPU (2048 x 2048 float32:
    1.08 s vs 0.095 s for one factorisation, one thread), and factorising the grid's systems as one batch
    is slower than one after another and holds every system at once."""
    out = {}
    for c, lam in lams.items():
        system = gram.clone()
        system.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(system)
        solved = torch.cholesky_solve(rhs, chol)
        ok = int(info) == 0 and bool(torch.isfinite(solved).all())
        out[c] = solved if ok else _pseudo_inverse_solve(system, rhs)
    return out


def score_products(phi: torch.Tensor, solutions: Mapping[float, torch.Tensor],
                   dtype: str = "float32") -> dict[float, torch.Tensor]:
    """For each c: phi @ solutions[c], all c in one product (products in `dtype`, float32 results)."""
    cs = list(solutions)
    if not cs:
        return {}
    with _products_in(dtype):
        joined = phi @ torch.cat([solutions[c] for c in cs], dim=1)
    return dict(zip(cs, joined.split(solutions[cs[0]].shape[1], dim=1)))


def kernel_scores(phi: torch.Tensor, phi_test: torch.Tensor, dampings: Sequence[float], form: str = "auto",
                  dtype: str = "float32", timings: dict[str, float] | None = None) -> dict[float, torch.Tensor]:
    """For each c: phi (phi^T phi + lambda I)^-1 phi_test^T, lambda = c trace(phi^T phi) / min(n, k).

    `form` 'primal' solves with the k x k kernel, 'dual' with the n x n Gram matrix (push-through identity:
    phi (phi^T phi + lam)^-1 = (phi phi^T + lam)^-1 phi); 'auto' takes the smaller one. `dtype`: precision of
    the kernel's and the scores' products ('bfloat16': bfloat16 products summed in float32); solves are float32.
    `timings` (if given) gets the seconds of the kernel, the solves and the score products added.
    """
    n, k = phi.shape
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"form must be auto, primal or dual, got {form!r}")
    trace = float((phi * phi).sum())
    lam_of = {c: c * trace / min(n, k) for c in dampings}
    if form == "primal" or (form == "auto" and k <= n):
        with timed(timings, "kernel_s"):
            gram = gram_matrix(phi, dtype=dtype)
        with timed(timings, "solve_s"):
            solutions = damped_solves(gram, phi_test.T, lam_of)
        with timed(timings, "product_s"):
            return score_products(phi, solutions, dtype)
    with timed(timings, "kernel_s"):
        gram, cross = gram_matrix(phi.T, dtype=dtype), gram_matrix(phi.T, phi_test.T, dtype)
    with timed(timings, "solve_s"):
        return damped_solves(gram, cross, lam_of)


@dataclasses.dataclass
class MemberScores:
    """One member's scores per damping c (None: undamped method) and TRAK's Q weights (averaged later)."""

    by_damping: dict[float | None, torch.Tensor]
    q: torch.Tensor | None
    timings: dict[str, float]  # kernel_s, product_s (damped methods) and solve_s: the rest of the scoring


def fisher_rows(curvature: Features) -> torch.Tensor:
    """Psi: minus the loss gradients' features at the sampled labels (IF's Fisher is Psi^T Psi / n)."""
    return loss_weight(curvature)[:, None] * curvature.phi


def fisher_scores(loss_rows: torch.Tensor, curvature_rows: torch.Tensor, phi_test: torch.Tensor,
                  dampings: Sequence[float], dtype: str = "float32",
                  timings: dict[str, float] | None = None) -> dict[float, torch.Tensor]:
    """For each c: loss_rows (H + lambda I)^-1 phi_test^T, H = Psi^T Psi / m (Psi = curvature_rows, m rows),
    lambda = c trace(H) / min(m, k). k x k Cholesky when k <= m, else Woodbury on the m x m Gram matrix.
    `dtype` and `timings` as in `kernel_scores`."""
    m, k = curvature_rows.shape
    psi = curvature_rows
    trace = float((psi * psi).sum()) / m
    if k <= m:
        lams = {c: c * trace / k for c in dampings}
        with timed(timings, "kernel_s"):
            h = gram_matrix(psi, dtype=dtype) / m
        with timed(timings, "solve_s"):
            solutions = damped_solves(h, phi_test.T, lams)
        with timed(timings, "product_s"):
            return score_products(loss_rows, solutions, dtype)
    # (Psi^T Psi/m + lam)^-1 = (I - Psi^T (m lam I + Psi Psi^T)^-1 Psi) / lam
    lams = {c: c * trace / m for c in dampings}
    with timed(timings, "kernel_s"):
        gram, cross = gram_matrix(psi.T, dtype=dtype), gram_matrix(psi.T, phi_test.T, dtype)
    with timed(timings, "solve_s"):
        solved = damped_solves(gram, cross, {c: m * lam for c, lam in lams.items()})
    with timed(timings, "product_s"), _products_in(dtype):
        return {c: loss_rows @ ((phi_test.T - psi.T @ solved[c]) / lams[c]) for c in dampings}


class MemberAverage:
    """Running mean of member scores; TRAK's Q is averaged separately and applied at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[float | None, torch.Tensor] = {}
        self.q_sum: torch.Tensor | None = None

    def add(self, member: MemberScores) -> None:
        self.count += 1
        for c, s in member.by_damping.items():
            self.sums[c] = s.clone() if c not in self.sums else self.sums[c].add_(s)
        if member.q is not None:
            self.q_sum = member.q.clone() if self.q_sum is None else self.q_sum.add_(member.q)

    def result(self) -> dict[float | None, torch.Tensor]:
        q = None if self.q_sum is None else self.q_sum / self.count
        return {c: (s / self.count) * (q[:, None] if q is not None else 1.0) for c, s in self.sums.items()}


# --- exact-Hessian influence (reference path) ---------------------------------------------------
def exact_if_scores(source: GradientSource, x_train: torch.Tensor, y_train: torch.Tensor,
                    train_grads: torch.Tensor, train_p: torch.Tensor, test_grads: torch.Tensor,
                    dampings: Sequence[float], fisher_trace: float, max_iter: int = 200, tol: float = 1e-6,
                    hessian: str = "exact",
                    ) -> tuple[dict[float, torch.Tensor], dict[str, float]]:
    """IF with the exact curvature of the mean training loss over the differentiated parameters:
    `curvature` 'exact' (the Hessian) or 'gauss-newton' (J^T H_z J, H_z the loss's Hessian in the
    logits: positive semi-definite, what the feature-space Fisher approximates), chosen by `hessian`.

    `train_grads` / `test_grads` are exact per-sample target gradients (projection 'none').
    Solves (H + lambda I) V = test_grads^T by batched conjugate gradient with Hessian-vector
    products (torch.func.jvp of grad); lambda = c * fisher_trace / min(n, n_params), with
    `fisher_trace` the trace of the Fisher path's H, so both paths use the same lambda. Columns that
    meet negative curvature (damping too small for an indefinite Hessian) stop there; `info` reports
    the worst residual.
    Returns scores per c and CG diagnostics.
    """
    model = source.model
    names = source.param_names
    params = source.params()
    fixed = source.fixed_tensors()
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    loss_grads = -weight_of(train_p)[:, None] * train_grads

    def logits_of(flat: torch.Tensor) -> torch.Tensor:
        p = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return functional_call(model, {**fixed, **p}, (x_train,))

    def loss_of_logits(logits: torch.Tensor) -> torch.Tensor:
        return per_example_loss(logits, y_train, source.sequence).mean()

    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    if hessian == "exact":
        grad_fn = grad(lambda flat: loss_of_logits(logits_of(flat)))
        hvp = vmap(lambda v: jvp(grad_fn, (flat0,), (v,))[1])  # rows of V -> rows of H V
    else:
        z0, pull_back = vjp(logits_of, flat0)
        grad_z = grad(loss_of_logits)

        def ggn_vp(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(logits_of, (flat0,), (v,))[1]
            return pull_back(jvp(grad_z, (z0,), (jv,))[1])[0]

        hvp = vmap(ggn_vp)
    rhs = test_grads  # [m, P]
    out, info = {}, {}
    for c in dampings:
        lam = c * fisher_trace / min(len(loss_grads), flat0.numel())
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        d = r.clone()
        rs = (r * r).sum(1)
        norm0 = rs.sqrt().clamp_min(1e-30)
        active = torch.ones(len(rhs), dtype=torch.bool, device=rhs.device)
        it = 0
        for it in range(1, max_iter + 1):
            hd = hvp(d) + lam * d
            d_hd = (d * hd).sum(1)
            active &= d_hd > 0  # a column meeting negative curvature keeps its last iterate
            alpha = torch.where(active, rs / d_hd.clamp_min(1e-30), torch.zeros_like(rs))
            x += alpha[:, None] * d
            r -= alpha[:, None] * hd
            rs_new = (r * r).sum(1)
            active &= rs_new.sqrt() / norm0 >= tol
            if not bool(active.any()):
                break
            d = r + (rs_new / rs.clamp_min(1e-30))[:, None] * d
            rs = rs_new
        out[c] = -(loss_grads @ x.T)
        info[f"cg_iters_c{c}"] = it
        info[f"cg_rel_residual_c{c}"] = float((rs_new.sqrt() / norm0).max())
    return out, info


# --- the method registry ---------------------------------------------------------------------------------
@dataclasses.dataclass
class ScoringInputs:
    """What one member gives its method: features of both splits and, where a method needs them, more."""

    train: Features
    test: Features
    curvature: Features | None = None  # features at labels sampled from the member (methods with curvature_draws)
    q: torch.Tensor | None = None  # forward-only Q (dropout-forward) replacing the member's own 1 - p
    dtype: str = "float32"  # precision of kernel and score products (`kernel_dtype`)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # a scorer may add named seconds
    source: GradientSource | None = None  # the training side's gradient source (references by CG)
    x_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None


Scorer = Callable[[ScoringInputs, Sequence[float | None]], tuple[dict, torch.Tensor | None]]


@dataclasses.dataclass(frozen=True)
class Method:
    """One TDA method: how it scores a member, and what the engine must prepare for it.

    `score(inputs, dampings)` returns (scores per damping c — key None for undamped methods — , the member's
    Q weights or None). `variants` are reference scorers chosen by `MethodSpec.hessian` (by CG on exact
    gradients); `scheme` holds store-key entries for schemes that changed under the same spec.
    """

    name: str
    label: str
    score: Scorer
    damped: bool = False  # takes a relative damping c (tuned on a validation split when not fixed)
    uses_q: bool = False  # scores are weighted by Q = 1 - p averaged over members (TRAK)
    curvature_draws: int = 0  # extra training-feature passes at labels sampled from the member (IF's Fisher)
    variants: Mapping[str, Scorer] = dataclasses.field(default_factory=dict)
    scheme: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""


def _score_trak(inputs: ScoringInputs, dampings: Sequence[float | None]) -> tuple[dict, torch.Tensor | None]:
    q = loss_weight(inputs.train) if inputs.q is None else inputs.q
    return kernel_scores(inputs.train.phi, inputs.test.phi, dampings, dtype=inputs.dtype, timings=inputs.timings), q


def _score_if(inputs: ScoringInputs, dampings: Sequence[float | None]) -> tuple[dict, torch.Tensor | None]:
    if inputs.curvature is None:
        raise ValueError("IF needs curvature features (loss gradients at sampled labels)")
    w = loss_weight(inputs.train)
    return fisher_scores(w[:, None] * inputs.train.phi, fisher_rows(inputs.curvature), inputs.test.phi,
                         dampings, inputs.dtype, inputs.timings), None


def _if_by_cg(hessian: str) -> Scorer:
    """IF with the full-parameter curvature `hessian` solved by CG; lambda from the Fisher path's trace."""

    def score(inputs: ScoringInputs, dampings: Sequence[float | None]) -> tuple[dict, torch.Tensor | None]:
        psi = fisher_rows(inputs.curvature)
        by, _ = exact_if_scores(inputs.source, inputs.x_train, inputs.y_train, inputs.train.phi, inputs.train.p,
                                inputs.test.phi, dampings, float((psi * psi).sum(1).mean()), hessian=hessian)
        return by, None

    return score


def _score_grad_dot(inputs: ScoringInputs, dampings: Sequence[float | None]) -> tuple[dict, torch.Tensor | None]:
    return {None: (loss_weight(inputs.train)[:, None] * inputs.train.phi) @ inputs.test.phi.T}, None


def _score_grad_cos(inputs: ScoringInputs, dampings: Sequence[float | None]) -> tuple[dict, torch.Tensor | None]:
    unit = inputs.train.phi / inputs.train.phi.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit_test = inputs.test.phi / inputs.test.phi.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {None: unit @ unit_test.T}, None


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    """Add a TDA method: the CLI, specs, planner, engine and app read it from here."""
    return METHODS.register(method.name, method)


register_method(Method("trak", "TRAK", _score_trak, damped=True, uses_q=True,
                       description="phi_i (Phi^T Phi + lambda I)^-1 phi_t, times Q = 1 - p averaged over members"))
register_method(Method("if", "Influence function", _score_if, damped=True, curvature_draws=1,
                       variants={"gauss-newton": _if_by_cg("gauss-newton"), "exact": _if_by_cg("exact")},
                       scheme={"if_curvature": "Fisher from sampled labels; lambda from its trace"},
                       description="w_i phi_i (H + lambda I)^-1 phi_t, H the Fisher from labels sampled from the model"))
register_method(Method("grad-dot", "Grad-Dot", _score_grad_dot, description="loss gradient . target gradient"))
register_method(Method("grad-cos", "Grad-Cos", _score_grad_cos, description="cosine of the two gradients"))


def hessians() -> tuple[str, ...]:
    """Every value `MethodSpec.hessian` can take: the default 'fisher' and each method's reference variants."""
    return ("fisher", *dict.fromkeys(v for _, m in METHODS.items() for v in m.variants))


def scorer(method: MethodSpec) -> Scorer:
    """The scoring function of a method spec (its variant when `hessian` names one)."""
    record = METHODS.get(method.name)
    return record.score if method.hessian == "fisher" else record.variants[method.hessian]


def member_scores(method: MethodSpec, train: Features, test: Features, dampings: Sequence[float | None],
                  q: torch.Tensor | None = None, curvature: Features | None = None,
                  **more: torch.Tensor | GradientSource) -> MemberScores:
    """Scores of one member by the method's scorer; `q` overrides TRAK's Q (dropout-forward: 1 - mask-averaged
    p); `curvature`: features at labels sampled from the model (IF's Fisher); `more`: ScoringInputs' other fields."""
    t0 = time.perf_counter()
    inputs = ScoringInputs(train, test, curvature, q, dtype=kernel_dtype(method, train.phi.device), **more)
    by, q = scorer(method)(inputs, dampings)
    timings = dict(inputs.timings)
    timings["solve_s"] = time.perf_counter() - t0 - timings.get("kernel_s", 0.0) - timings.get("product_s", 0.0)
    return MemberScores(by, q, timings)
