"""Methods against reference computations: autograd loops, TRAK's closed form, exact-Hessian IF."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from tda_core.attribution import attribute
from tda_core.features import Features, GradientSource, all_param_names, compute_features
from tda_core.methods import (MemberAverage, damped_solves, exact_if_scores, fisher_scores, kernel_dtype, kernel_scores,
                              member_scores)
from tda_core.models import MLP
from tda_core.objectives import target
from tda_core.specs import EnsembleSpec, MethodSpec, Recipe
from tda_core.tasks import get_task

TINY_DIGITS = dataclasses.replace(get_task("digits-mlp"), recipe=Recipe(epochs=2, batch_size=64, lr=0.01))
TRAINED_DIGITS = dataclasses.replace(get_task("digits-mlp"), recipe=Recipe(epochs=10, batch_size=64, lr=0.01))


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """One store for the digits tests of this module (the base model is trained once)."""
    from tda_core.store import Store

    return Store(tmp_path_factory.mktemp("digits_store"))


def _grad(model: nn.Module, value: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    value.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.fixture
def small_setup():
    torch.manual_seed(0)
    model = MLP(in_features=10, hidden=(8, 6), n_classes=3).eval()
    x_tr, y_tr = torch.randn(12, 10), torch.randint(0, 3, (12,))
    x_te, y_te = torch.randn(5, 10), torch.randint(0, 3, (5,))
    src = GradientSource(model, all_param_names(model), False)
    return model, src, (x_tr, y_tr), (x_te, y_te)


def test_grad_dot_and_grad_cos_equal_an_autograd_loop(small_setup):
    model, src, (x_tr, y_tr), (x_te, y_te) = small_setup
    train = compute_features(src, x_tr, y_tr)
    test = compute_features(src, x_te, y_te)
    loss_g = torch.stack([_grad(model, F.cross_entropy(model(x_tr[i:i + 1]), y_tr[i:i + 1])) for i in range(12)])
    tgt_g = torch.stack([_grad(model, target(model(x_te[j:j + 1]), y_te[j:j + 1], False).sum()) for j in range(5)])
    dot = member_scores(MethodSpec("grad-dot", "none"), train, test, [None]).by_damping[None]
    cos = member_scores(MethodSpec("grad-cos", "none"), train, test, [None]).by_damping[None]
    assert torch.allclose(dot, -(loss_g @ tgt_g.T), atol=1e-5, rtol=1e-4)  # helpful = lowers loss, raises target
    want_cos = -F.normalize(loss_g, dim=1) @ F.normalize(tgt_g, dim=1).T
    assert torch.allclose(cos, want_cos, atol=1e-5)


def test_trak_without_projection_equals_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).eval()
    x_tr, y_tr = torch.randn(20, 6), torch.randint(0, 3, (20,))
    x_te, y_te = torch.randn(4, 6), torch.randint(0, 3, (4,))
    src = GradientSource(model, all_param_names(model), False)

    def closed_form_grads(x, y):  # margin z_y - logsumexp_{c != y} z_c, by hand
        z = model(x).detach()
        others = z.scatter(1, y[:, None], float("-inf")).softmax(1)
        dz = F.one_hot(y, 3).float() - others
        return torch.cat([(dz[:, :, None] * x[:, None, :]).reshape(len(x), -1), dz], 1), z.softmax(1)

    g_tr, prob = closed_form_grads(x_tr, y_tr)
    g_te, _ = closed_form_grads(x_te, y_te)
    q = 1 - prob.gather(1, y_tr[:, None]).squeeze(1)
    k = g_tr.shape[1]
    kernel = g_tr.T.double() @ g_tr.double()
    lam = 0.5 * float(torch.trace(kernel)) / min(k, len(x_tr))  # k = 21 > n = 20: dual form
    want = (g_tr.double() @ torch.linalg.solve(kernel + lam * torch.eye(k, dtype=torch.float64), g_te.T.double()))
    want = (want * q[:, None].double()).float()
    train, test = compute_features(src, x_tr, y_tr), compute_features(src, x_te, y_te)
    avg = MemberAverage()
    avg.add(member_scores(MethodSpec("trak", "none", damping=0.5), train, test, [0.5]))
    assert torch.allclose(avg.result()[0.5], want, atol=1e-4, rtol=1e-3)


def test_kernel_scores_primal_dual_and_float64_agree():
    g = torch.Generator().manual_seed(0)
    for n, k in ((40, 25), (15, 60)):  # k <= n (auto takes the primal form) and k > n (auto takes the dual)
        phi, phi_t = torch.randn(n, k, generator=g), torch.randn(7, k, generator=g)
        primal = kernel_scores(phi, phi_t, [0.1, 2.0], form="primal")
        dual = kernel_scores(phi, phi_t, [0.1, 2.0], form="dual")
        auto = kernel_scores(phi, phi_t, [0.1, 2.0])
        for c in (0.1, 2.0):
            lam = c * float((phi * phi).sum()) / min(n, k)
            ref = phi.double() @ torch.linalg.solve(phi.T.double() @ phi.double() + lam * torch.eye(k).double(),
                                                    phi_t.T.double())
            for got in (primal[c], dual[c], auto[c]):
                assert float((got.double() - ref).norm() / ref.norm()) < 1e-4
            assert float((primal[c] - dual[c]).norm() / dual[c].norm()) < 1e-4


def test_bfloat16_products_stay_within_their_rounding_of_float64():
    """Kernel and score products in bfloat16 (summed in float32) against a float64 solve: both forms and IF's."""
    g = torch.Generator().manual_seed(2)
    for n, k in ((300, 64), (40, 90)):
        phi, phi_t = torch.randn(n, k, generator=g), torch.randn(9, k, generator=g)
        got = kernel_scores(phi, phi_t, [0.1, 3.0], dtype="bfloat16")
        for c in (0.1, 3.0):
            lam = c * float((phi * phi).sum()) / min(n, k)
            ref = phi.double() @ torch.linalg.solve(phi.T.double() @ phi.double() + lam * torch.eye(k).double(),
                                                    phi_t.T.double())
            assert float((got[c].double() - ref).norm() / ref.norm()) < 2e-2
    loss, psi = torch.randn(30, 25, generator=g), torch.randn(40, 25, generator=g)
    phi_t = torch.randn(6, 25, generator=g)
    exact, low = fisher_scores(loss, psi, phi_t, [0.5]), fisher_scores(loss, psi, phi_t, [0.5], "bfloat16")
    assert float((low[0.5] - exact[0.5]).norm() / exact[0.5].norm()) < 2e-2
    with pytest.raises(ValueError, match="kernel dtype"):
        kernel_scores(phi, phi_t, [1.0], dtype="float16")


def test_kernel_precision_follows_the_projection_dtype_and_device():
    assert kernel_dtype(MethodSpec("trak", "kron"), "cpu") == "bfloat16"
    assert kernel_dtype(MethodSpec("trak", "kron", proj_dtype="float32"), "cpu") == "float32"
    assert kernel_dtype(MethodSpec("trak", "none"), "cpu") == "float32"  # exact gradients: the reference path
    assert kernel_dtype(MethodSpec("trak", "dense"), "cuda") == "float32"


def test_damped_solves_equal_a_float64_solve_per_c_and_fall_back_on_singular_systems():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 12, generator=g)
    gram, rhs = a.T @ a, torch.randn(12, 4, generator=g)
    lams = {0.1: 0.1, 1.0: 1.0, 10.0: 10.0}
    got = damped_solves(gram, rhs, lams)
    for c, lam in lams.items():
        want = torch.linalg.solve(gram.double() + lam * torch.eye(12).double(), rhs.double())
        assert float((got[c].double() - want).norm() / want.norm()) < 1e-4
    singular = gram.clone()
    singular[0, :] = singular[:, 0] = 0.0  # no Cholesky at lambda = 0: the pseudo-inverse instead
    x = damped_solves(singular, rhs, {0.0: 0.0, 1.0: 1.0})[0.0]
    want = torch.linalg.pinv(singular.double(), rtol=1e-10) @ rhs.double()
    assert float((x.double() - want).norm() / want.norm()) < 1e-3


@pytest.mark.parametrize("rows", [40, 12])  # k = 25 <= rows: k x k Cholesky; k > rows: Woodbury
def test_fisher_scores_equal_a_float64_solve(rows):
    g = torch.Generator().manual_seed(1)
    loss, psi, phi_t = torch.randn(30, 25, generator=g), torch.randn(rows, 25, generator=g), torch.randn(6, 25,
                                                                                                        generator=g)
    for c, got in fisher_scores(loss, psi, phi_t, [0.05, 3.0]).items():
        h = psi.double().T @ psi.double() / rows
        lam = c * float(torch.trace(h)) / min(rows, 25)
        want = loss.double() @ torch.linalg.solve(h + lam * torch.eye(25).double(), phi_t.T.double())
        assert float((got.double() - want).norm() / want.norm()) < 1e-4


def test_exact_baseline_equals_grad_dot_kernel_on_digits(digits_store):
    """TRAK on exact gradients with dominant damping is Grad-Dot's kernel (times Q) divided by lambda."""
    pos = torch.arange(6)
    dot = attribute(TINY_DIGITS, MethodSpec("grad-dot", "none"), EnsembleSpec(), store=digits_store, device="cpu",
                    test_positions=pos)
    c = 1e7
    trak = attribute(TINY_DIGITS, MethodSpec("trak", "none", damping=c), EnsembleSpec(), store=digits_store,
                     device="cpu", test_positions=pos)
    from tda_core.data import load_dataset
    from tda_core.training import load_or_train

    model = load_or_train(TINY_DIGITS, [0], store=digits_store, device="cpu")[0].model
    src = GradientSource(model, all_param_names(model), False)
    ds = load_dataset("digits")
    phi = compute_features(src, ds.x_train, ds.y_train).phi
    lam = c * float((phi * phi).sum()) / min(phi.shape)
    assert torch.allclose(trak.scores * lam, dot.scores, rtol=1e-3, atol=1e-3 * float(dot.scores.abs().max()))


def _rank_corr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])]


def test_if_fisher_agrees_with_exact_hessian_cg_on_digits(digits_store):
    """IF's Fisher (sampled labels, feature space, exact gradients) vs the exact Hessian solved by CG, both at
    c = 30, where the trained net's damped Hessian is positive definite (at c = 1 CG meets negative curvature)
    and the Hessian IF is not Grad-Dot in disguise (rank correlation 0.78; benchmarks/bench_if_curvature.py)."""
    pos = torch.arange(10)

    def scores(hessian: str = "fisher", name: str = "if") -> torch.Tensor:
        return attribute(TRAINED_DIGITS, MethodSpec(name, "none", damping=30.0, hessian=hessian), EnsembleSpec(),
                         store=digits_store, device="cpu", test_positions=pos).scores

    exact = scores("exact")
    to_exact = _rank_corr(scores(), exact)
    to_dot = _rank_corr(scores(name="grad-dot"), exact)
    assert sum(to_exact) / len(pos) >= 0.9, to_exact
    assert sum(to_exact) / len(pos) >= sum(to_dot) / len(pos) + 0.1, (to_exact, to_dot)  # measured 0.96 vs 0.78


def test_gauss_newton_cg_matches_exact_hessian_at_moderate_damping(digits_store):
    """The full-parameter Gauss-Newton IF is what the Fisher estimates; at c = 30 it ranks like the Hessian."""
    pos = torch.arange(6)
    runs = [attribute(TRAINED_DIGITS, MethodSpec("if", "none", damping=30.0, hessian=h), EnsembleSpec(),
                      store=digits_store, device="cpu", test_positions=pos).scores for h in ("gauss-newton", "exact")]
    assert min(_rank_corr(*runs)) >= 0.9


def test_exact_if_solves_the_damped_hessian_system(small_setup):
    model, src, (x_tr, y_tr), (x_te, y_te) = small_setup
    train, test = compute_features(src, x_tr, y_tr), compute_features(src, x_te, y_te)
    c = 10.0  # large enough for H + lambda I to be positive definite at this untrained model (asserted below)
    trace = float(((1 - train.p)[:, None] * train.phi).pow(2).sum(1).mean())
    scores, info = exact_if_scores(src, x_tr, y_tr, train.phi, train.p, test.phi, [c], trace, tol=1e-7, max_iter=500)
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def mean_loss(v):
        chunks, out, start = {}, None, 0
        for n, p in params.items():
            chunks[n] = v[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        out = torch.func.functional_call(model, chunks, (x_tr,))
        return F.cross_entropy(out, y_tr)

    h = torch.autograd.functional.hessian(mean_loss, flat).double()
    w = 1 - train.p
    lam = c * float(((w[:, None] * train.phi) ** 2).sum(1).mean()) / min(len(x_tr), flat.numel())
    assert float(torch.linalg.eigvalsh(h).min()) + lam > 0
    want = (w[:, None].double() * train.phi.double()) @ torch.linalg.solve(h + lam * torch.eye(len(flat)).double(),
                                                                          test.phi.T.double())
    assert torch.allclose(scores[c].double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert info[f"cg_rel_residual_c{c}"] < 1e-5


def test_gauss_newton_if_solves_its_damped_system(small_setup):
    """CG with Gauss-Newton products equals a direct solve with J^T H_z J built from autograd Jacobians."""
    model, src, (x_tr, y_tr), (x_te, y_te) = small_setup
    train, test = compute_features(src, x_tr, y_tr), compute_features(src, x_te, y_te)
    c = 0.1  # the Gauss-Newton matrix is positive semi-definite: small damping is fine
    trace = float(((1 - train.p)[:, None] * train.phi).pow(2).sum(1).mean())
    scores, info = exact_if_scores(src, x_tr, y_tr, train.phi, train.p, test.phi, [c], trace, tol=1e-8,
                                   max_iter=500, hessian="gauss-newton")
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def logits(v):
        chunks, start = {}, 0
        for n, p in params.items():
            chunks[n] = v[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        return torch.func.functional_call(model, chunks, (x_tr,))

    jac = torch.autograd.functional.jacobian(logits, flat).double()  # [n, C, P]
    prob = logits(flat).softmax(1).double()
    h_z = (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) / len(x_tr)  # CE Hessian in the logits
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, h_z, jac)
    w = 1 - train.p
    lam = c * float(((w[:, None] * train.phi) ** 2).sum(1).mean()) / min(len(x_tr), flat.numel())
    want = (w[:, None].double() * train.phi.double()) @ torch.linalg.solve(ggn + lam * torch.eye(len(flat)).double(),
                                                                          test.phi.T.double())
    assert torch.allclose(scores[c].double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert info[f"cg_rel_residual_c{c}"] < 1e-5


def test_sequence_features_score_without_q(small_setup):
    phi = torch.randn(9, 4)
    train = Features(phi, torch.full((9,), float("nan")), {})
    test = Features(torch.randn(3, 4), torch.full((3,), float("nan")), {})
    trak = member_scores(MethodSpec("trak", "none"), train, test, [1.0])
    assert torch.equal(trak.q, torch.ones(9))
    dot = member_scores(MethodSpec("grad-dot", "none"), train, test, [None]).by_damping[None]
    assert torch.allclose(dot, phi @ test.phi.T)


# --- peer check: dattri on the same checkpoint ----------------------------------------------------
def _dattri_task(model: nn.Module, train_fn, target_fn):
    from dattri.task import AttributionTask

    return AttributionTask(loss_func=train_fn, model=model, checkpoints=model.state_dict(), target_func=target_fn)


def test_peer_dattri_grad_dot_grad_cos_and_trak(digits_store):
    pytest.importorskip("dattri", reason="dattri (requirements-dev.txt) is the peer reference")
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    from tda_core.data import load_dataset
    from tda_core.objectives import correct_probability, margin
    from tda_core.training import load_or_train

    model = load_or_train(TINY_DIGITS, [0], store=digits_store, device="cpu")[0].model
    ds = load_dataset("digits")
    pos = torch.arange(10)
    train_loader = DataLoader(TensorDataset(ds.x_train, ds.y_train), batch_size=256, shuffle=False)
    test_loader = DataLoader(TensorDataset(ds.x_test[pos], ds.y_test[pos]), batch_size=256, shuffle=False)

    def logits(params, x):
        return functional_call(model, params, (x.unsqueeze(0),))

    def loss_fn(params, data):
        return F.cross_entropy(logits(params, data[0]), data[1].unsqueeze(0))

    def neg_margin(params, data):  # dattri scores grad loss . grad target; ours: helpful = -grad loss . grad f
        return -margin(logits(params, data[0]), data[1].unsqueeze(0)).sum()

    def margin_fn(params, data):
        return margin(logits(params, data[0]), data[1].unsqueeze(0)).sum()

    def prob_fn(params, data):
        return correct_probability(logits(params, data[0]), data[1].unsqueeze(0))

    for name, normalized in (("grad-dot", False), ("grad-cos", True)):
        peer = TracInAttributor(_dattri_task(model, loss_fn, neg_margin), weight_list=torch.ones(1),
                                normalized_grad=normalized)
        peer.projector_kwargs = None  # exact gradients
        theirs = peer.attribute(train_loader, test_loader)
        ours = attribute(TINY_DIGITS, MethodSpec(name, "none"), EnsembleSpec(), store=digits_store, device="cpu",
                         test_positions=pos)
        assert torch.allclose(ours.scores, theirs, atol=1e-4, rtol=1e-4), name

    k = 1024
    ours = attribute(TINY_DIGITS, MethodSpec("trak", "dense", proj_dim=k), EnsembleSpec(), store=digits_store,
                     device="cpu", test_positions=pos)
    other_seed = attribute(TINY_DIGITS, MethodSpec("trak", "dense", proj_dim=k, seed=1), EnsembleSpec(),
                           store=digits_store, device="cpu", test_positions=pos)
    src = GradientSource(model, all_param_names(model), False)
    phi = compute_features(src, ds.x_train[:300], ds.y_train[:300]).phi
    lam = float((phi * phi).sum()) * len(ds.x_train) / 300 / k  # our lambda at c = 1, from a sample of the trace
    peer = TRAKAttributor(_dattri_task(model, margin_fn, margin_fn), correct_probability_func=prob_fn,
                          projector_kwargs={"proj_dim": k, "device": "cpu"},
                          regularization=lam / src.n_params)  # dattri divides gradients by sqrt(n_params)
    peer.cache(train_loader)
    theirs = peer.attribute(test_loader)

    def mean_rho(a, b):
        return sum(spearmanr(a[:, j], b[:, j])[0] for j in range(len(pos))) / len(pos)

    # two independent projections can agree no better than their own noise allows: compare with that
    peer_rho, seed_rho = mean_rho(ours.scores, theirs), mean_rho(ours.scores, other_seed.scores)
    assert peer_rho > 0.8 * seed_rho and peer_rho > 0.4, (peer_rho, seed_rho)
