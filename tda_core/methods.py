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
from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from .features import Features, GradientSource
from .objectives import per_example_loss
from .specs import MethodSpec

DAMPED = ("trak", "if")


def loss_weight(features: Features) -> torch.Tensor:
    """w with grad loss = -w * grad target: 1 - p (classification) or 1 (sequences, p is NaN)."""
    return torch.where(torch.isnan(features.p), torch.ones_like(features.p), 1.0 - features.p)


def _cholesky_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b (a symmetric PD) by float32 Cholesky; float64 eigen-solve (pseudo-inverse) if that fails."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(b, chol)
        if torch.isfinite(x).all():
            return x
    evals, evecs = torch.linalg.eigh(a.double())
    inv = torch.where(evals > evals.max() * 1e-10, 1.0 / evals, torch.zeros_like(evals))
    return (evecs @ (inv[:, None] * (evecs.T @ b.double()))).to(b.dtype)


def kernel_scores(phi: torch.Tensor, phi_test: torch.Tensor, dampings: Sequence[float]) -> dict[float, torch.Tensor]:
    """For each c: phi (phi^T phi + lambda I)^-1 phi_test^T, lambda = c trace(phi^T phi) / min(n, k).

    Uses the k x k kernel when k <= n, else the n x n dual form (push-through identity).
    """
    n, k = phi.shape
    trace = float((phi * phi).sum())
    out = {}
    if k <= n:
        gram = phi.T @ phi
        eye = torch.eye(k, dtype=phi.dtype, device=phi.device)
        for c in dampings:
            lam = c * trace / k
            out[c] = phi @ _cholesky_solve(gram + lam * eye, phi_test.T)
    else:  # phi (phi^T phi + lam)^-1 = (phi phi^T + lam)^-1 phi
        gram = phi @ phi.T
        cross = phi @ phi_test.T
        eye = torch.eye(n, dtype=phi.dtype, device=phi.device)
        for c in dampings:
            out[c] = _cholesky_solve(gram + c * trace / n * eye, cross)
    return out


@dataclasses.dataclass
class MemberScores:
    """One member's scores per damping c (None: undamped method) and TRAK's Q weights (averaged later)."""

    by_damping: dict[float | None, torch.Tensor]
    q: torch.Tensor | None
    solve_s: float


def fisher_rows(curvature: Features) -> torch.Tensor:
    """Psi: minus the loss gradients' features at the sampled labels (IF's Fisher is Psi^T Psi / n)."""
    return loss_weight(curvature)[:, None] * curvature.phi


def fisher_scores(loss_rows: torch.Tensor, curvature_rows: torch.Tensor, phi_test: torch.Tensor,
                  dampings: Sequence[float]) -> dict[float, torch.Tensor]:
    """For each c: loss_rows (H + lambda I)^-1 phi_test^T, H = Psi^T Psi / m (Psi = curvature_rows, m rows),
    lambda = c trace(H) / min(m, k). k x k Cholesky when k <= m, else Woodbury on the m x m Gram matrix."""
    m, k = curvature_rows.shape
    psi = curvature_rows
    trace = float((psi * psi).sum()) / m
    out = {}
    if k <= m:
        h = psi.T @ psi / m
        eye = torch.eye(k, dtype=psi.dtype, device=psi.device)
        for c in dampings:
            out[c] = loss_rows @ _cholesky_solve(h + c * trace / k * eye, phi_test.T)
    else:  # (Psi^T Psi/m + lam)^-1 = (I - Psi^T (m lam I + Psi Psi^T)^-1 Psi) / lam
        gram, cross = psi @ psi.T, psi @ phi_test.T
        eye = torch.eye(m, dtype=psi.dtype, device=psi.device)
        for c in dampings:
            lam = c * trace / m
            sol = (phi_test.T - psi.T @ _cholesky_solve(gram + m * lam * eye, cross)) / lam
            out[c] = loss_rows @ sol
    return out


def member_scores(method: MethodSpec, train: Features, test: Features, dampings: Sequence[float],
                  q: torch.Tensor | None = None, curvature: Features | None = None) -> MemberScores:
    """Scores of one member. `q` overrides TRAK's Q (dropout-forward: 1 - mask-averaged p).
    `curvature` (IF): features at labels sampled from the model, for the Fisher."""
    t0 = time.perf_counter()
    w = loss_weight(train)
    phi, phi_test = train.phi, test.phi
    if method.name == "trak":
        by = kernel_scores(phi, phi_test, dampings)
        q = w if q is None else q
    elif method.name == "if":
        if curvature is None:
            raise ValueError("IF needs curvature features (loss gradients at sampled labels)")
        by = fisher_scores(w[:, None] * phi, fisher_rows(curvature), phi_test, dampings)
        q = None
    elif method.name == "grad-dot":
        by, q = {None: (w[:, None] * phi) @ phi_test.T}, None
    else:  # grad-cos
        unit = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)
        unit_test = phi_test / phi_test.norm(dim=1, keepdim=True).clamp_min(1e-30)
        by, q = {None: unit @ unit_test.T}, None
    return MemberScores(by, q, time.perf_counter() - t0)


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
                    curvature: str = "exact",
                    ) -> tuple[dict[float, torch.Tensor], dict[str, float]]:
    """IF with the exact curvature of the mean training loss over the differentiated parameters:
    `curvature` 'exact' (the Hessian) or 'gauss-newton' (J^T H_z J, H_z the loss's Hessian in the
    logits: positive semi-definite, what the feature-space Fisher approximates).

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
    fixed = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if n not in names}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    w = torch.where(torch.isnan(train_p), torch.ones_like(train_p), 1.0 - train_p)
    loss_grads = -w[:, None] * train_grads

    def logits_of(flat: torch.Tensor) -> torch.Tensor:
        p = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return functional_call(model, {**fixed, **p}, (x_train,))

    def loss_of_logits(logits: torch.Tensor) -> torch.Tensor:
        return per_example_loss(logits, y_train, source.sequence).mean()

    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    if curvature == "exact":
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
            curvature = (d * hd).sum(1)
            active &= curvature > 0  # a column meeting negative curvature keeps its last iterate
            alpha = torch.where(active, rs / curvature.clamp_min(1e-30), torch.zeros_like(rs))
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
