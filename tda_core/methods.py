"""TRAK, IF, Grad-Dot and Grad-Cos from one member's features, and member averaging.

Every score matrix is [n_train, n_test], higher = more helpful (training on the example
raises the test target). With phi the target-gradient features and w = 1 - p
(classification) or 1 (sequences), the training-loss gradient is ``-w * phi``, so:
- Grad-Dot  = w_i phi_i . phi_t;     Grad-Cos = cos(phi_i, phi_t);
- TRAK      = phi_i^T (Phi^T Phi + lambda I)^-1 phi_t, times Q_i = w_i averaged over members;
- IF        = w_i phi_i^T (H + lambda I)^-1 phi_t with H = Phi^T diag(w^2) Phi / n, the empirical
              Fisher of the mean training loss (Gauss-Newton in feature space);
- IF exact  = the same with H the exact Hessian, solved by conjugate gradient on the full
              parameters (`exact_if_scores`, small models only; the reference for the tests).
Damping is relative: lambda = c * trace(kernel) / min(n, k), the mean non-zero eigenvalue of the
kernel (k = feature dimension, n = training examples). With k <= n, as for every projected run
on MNIST, this is the usual trace / k; for exact gradients (k >> n) it keeps c on the same scale.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, jvp, vmap

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


def kernel_scores(phi: torch.Tensor, phi_test: torch.Tensor, dampings: Sequence[float],
                  scale: float = 1.0) -> dict[float, torch.Tensor]:
    """For each c: phi (phi^T phi / scale + lambda I)^-1 phi_test^T, lambda = c trace(phi^T phi / scale) / min(n, k).

    Uses the k x k kernel when k <= n, else the n x n dual form (push-through identity).
    """
    n, k = phi.shape
    trace = float((phi * phi).sum()) / scale
    out = {}
    if k <= n:
        gram = phi.T @ phi / scale
        eye = torch.eye(k, dtype=phi.dtype, device=phi.device)
        for c in dampings:
            lam = c * trace / k
            out[c] = phi @ _cholesky_solve(gram + lam * eye, phi_test.T)
    else:  # phi (phi^T phi/s + lam)^-1 = s (phi phi^T + s lam)^-1 phi
        gram = phi @ phi.T
        cross = phi @ phi_test.T
        eye = torch.eye(n, dtype=phi.dtype, device=phi.device)
        for c in dampings:
            lam = c * trace / n
            out[c] = scale * _cholesky_solve(gram + scale * lam * eye, cross)
    return out


@dataclasses.dataclass
class MemberScores:
    """One member's scores per damping c (None: undamped method) and TRAK's Q weights (averaged later)."""

    by_damping: dict[float | None, torch.Tensor]
    q: torch.Tensor | None
    solve_s: float


def member_scores(method: MethodSpec, train: Features, test: Features, dampings: Sequence[float],
                  q: torch.Tensor | None = None) -> MemberScores:
    """Scores of one member. `q` overrides TRAK's Q (dropout-forward: 1 - mask-averaged p)."""
    t0 = time.perf_counter()
    w = loss_weight(train)
    phi, phi_test = train.phi, test.phi
    if method.name == "trak":
        by = kernel_scores(phi, phi_test, dampings)
        q = w if q is None else q
    elif method.name == "if":
        wphi = w[:, None] * phi
        by = kernel_scores(wphi, phi_test, dampings, scale=float(len(phi)))
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
                    dampings: Sequence[float], max_iter: int = 200, tol: float = 1e-6,
                    ) -> tuple[dict[float, torch.Tensor], dict[str, float]]:
    """IF with the exact Hessian of the mean training loss over the differentiated parameters.

    `train_grads` / `test_grads` are exact per-sample target gradients (projection 'none').
    Solves (H + lambda I) V = test_grads^T by batched conjugate gradient with Hessian-vector
    products (torch.func.jvp of grad); lambda = c * trace(F) / min(n, n_params) with F the
    empirical Fisher, so it equals the Fisher path's lambda. Columns that meet negative curvature
    (damping too small for an indefinite Hessian) stop there; `info` reports the worst residual.
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
    fisher_trace = float((loss_grads * loss_grads).sum(1).mean())

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        p = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        logits = functional_call(model, {**fixed, **p}, (x_train,))
        return per_example_loss(logits, y_train, source.sequence).mean()

    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    grad_fn = grad(mean_loss)
    hvp = vmap(lambda v: jvp(grad_fn, (flat0,), (v,))[1])  # rows of V -> rows of H V
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
