"""How close IF's curvature approximations rank training examples to the exact-Hessian IF, on digits.

Usage: python -m benchmarks.bench_if_curvature [--epochs 10] [--n-test 20] [--dampings 1,10,30,100]
Trains the digits MLP (seed 0, the recipe's other settings, `--epochs` epochs) on a temporary store, takes
exact per-sample gradients (no projection) and, per relative damping c, prints the mean (and minimum)
per-test-example Spearman correlation between the exact-Hessian IF (CG) and: IF with the Fisher from
sampled labels (the product's IF), the empirical Fisher at the true labels, the full Gauss-Newton
matrix (CG), and Grad-Dot. Every curvature uses the same lambda (from the sampled Fisher's trace).
Where CG meets negative curvature (the damped Hessian is indefinite) its residual is printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile

import torch
from scipy.stats import spearmanr

from tda_core.data import load_dataset
from tda_core.features import GradientSource, all_param_names, compute_features, derive_seed, sample_labels
from tda_core.methods import exact_if_scores, fisher_rows, fisher_scores, loss_weight
from tda_core.store import Store
from tda_core.tasks import get_task
from tda_core.training import load_or_train


def rank_agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    rho = [spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])]
    return f"{sum(rho) / len(rho):.3f} (min {min(rho):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--dampings", default="1,10,30,100")
    args = parser.parse_args()
    base_task = get_task("digits-mlp")
    task = dataclasses.replace(base_task, recipe=dataclasses.replace(base_task.recipe, epochs=args.epochs))
    cs = [float(c) for c in args.dampings.split(",")]
    ds = load_dataset(task.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_or_train(task, [0], store=Store(tmp), device="cpu", dataset=ds)[0].model.eval()
    src = GradientSource(model, all_param_names(model), False)
    train = compute_features(src, ds.x_train, ds.y_train)
    test = compute_features(src, ds.x_test[:args.n_test], ds.y_test[:args.n_test])
    sampled = sample_labels(src, ds.x_train, ds.y_train, derive_seed(0, "fisher", "bench", 0))
    psi = fisher_rows(compute_features(src, ds.x_train, sampled))
    loss_rows = loss_weight(train)[:, None] * train.phi
    trace = float((psi * psi).sum(1).mean())
    fisher = fisher_scores(loss_rows, psi, test.phi, cs)
    ratio = trace / float((loss_rows ** 2).sum(1).mean())  # the empirical Fisher's c for the same lambda
    empirical = {c: fisher_scores(loss_rows, loss_rows, test.phi, [c * ratio])[c * ratio] for c in cs}
    exact, info = exact_if_scores(src, ds.x_train, ds.y_train, train.phi, train.p, test.phi, cs, trace, max_iter=500)
    gauss_newton, _ = exact_if_scores(src, ds.x_train, ds.y_train, train.phi, train.p, test.phi, cs, trace,
                                      max_iter=500, hessian="gauss-newton")
    grad_dot = loss_rows @ test.phi.T
    print(f"digits MLP, {args.epochs} epochs, {ds.n_train} train, {args.n_test} test examples, exact gradients; "
          "rank correlation with the exact-Hessian IF:")
    for c in cs:
        residual = info[f"cg_rel_residual_c{c}"]
        note = "" if residual < 1e-4 else f"   [Hessian CG stopped at negative curvature, residual {residual:.1e}]"
        print(f"c = {c:g}: Fisher (sampled labels) {rank_agreement(fisher[c], exact[c])} | empirical Fisher "
              f"{rank_agreement(empirical[c], exact[c])} | Gauss-Newton {rank_agreement(gauss_newton[c], exact[c])}"
              f" | Grad-Dot {rank_agreement(grad_dot, exact[c])}{note}")


if __name__ == "__main__":
    main()
