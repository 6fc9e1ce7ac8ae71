"""Seconds per TRAK member: our dense (bfloat16 default, float32) and Kronecker projections vs dattri's TRAK.

Usage: python -m benchmarks.bench_attribution [--task mnist-mlp] [--k 2048] [--n-test 500] [--no-dattri] [--lds]
                                             [--no-dense] [--seeds N]
The base model comes from the store (trained once if missing). Each projection runs on a fresh temporary store
holding only that checkpoint, so nothing is served from a feature cache. Prints the machine's limit (torch.matmul
GFLOP/s in float32 and bfloat16, measured in the same run), the dense projection's product for candidate chunk
sizes, dtypes and thread counts (the fastest, and what the code uses), seconds per member with their breakdown, the
floor (one forward + backward pass over every training example, batched: what any gradient feature costs at least)
and each member's ratio to it, the same floor over the training and test examples together (a member differentiates
both), and each kernel's achieved GFLOP/s beside the limit (Kronecker with the default bfloat16 kernel products,
with float32 ones, and with the damping grid `run` tunes over), dattri's seconds (cache + attribute), the ratios,
and how well the score matrices agree (mean per-test Spearman and Pearson correlation; two independent random
projections disagree on the ranks of the many near-zero scores, so Pearson is the clearer signal of agreement on the
large ones). With --lds, also the LDS of every score matrix (ours and dattri's, all at relative damping c = 1)
against the task's M = 50 ground truth, on the evaluation split of the test set, and the serving seconds per member
that `run` records (naive I = 1, Dropout I = 1 D = 5, naive I = 2, damping tuned over the grid) against the member
figures above.
With --seeds N, also the LDS of dense and Kronecker TRAK for projection seeds 0..N-1 (same checkpoint, c = 1):
whether the two projections differ by more than their seed-to-seed spread.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from scipy.stats import pearsonr, spearmanr

from benchmarks.machine_limit import limit_line, matmul_limits, rate
from tda_core.attribution import attribute
from tda_core.data import load_dataset
from tda_core.device import describe_device, resolve_device
from tda_core.experiments import DAMPING_GRID
from tda_core.methods import kernel_dtype
from tda_core.projections import DenseJL
from tda_core.specs import EnsembleSpec, MethodSpec
from tda_core.store import Store
from tda_core.tasks import get_task
from tda_core.training import CHECKPOINT_KIND, load_or_train


def agreement(a: torch.Tensor, b: torch.Tensor, columns: int = 50) -> str:
    """Mean per-test-example Spearman and Pearson correlation of two score matrices (first columns)."""
    cols = range(min(columns, a.shape[1]))
    rho = sum(spearmanr(a[:, j], b[:, j])[0] for j in cols) / len(cols)
    r = sum(pearsonr(a[:, j], b[:, j])[0] for j in cols) / len(cols)
    return f"Spearman {rho:.3f}, Pearson {r:.3f}"


def run_dattri(model: torch.nn.Module, ds, n_test: int, k: int, regularization: float, device: torch.device):
    """dattri 0.3.0 TRAK on the same checkpoint and target; returns (scores, seconds)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    from tda_core.objectives import correct_probability, margin

    def logits(params, x):
        return functional_call(model, params, (x.unsqueeze(0),))

    def margin_fn(params, data):
        return margin(logits(params, data[0]), data[1].unsqueeze(0)).sum()

    def prob_fn(params, data):
        return correct_probability(logits(params, data[0]), data[1].unsqueeze(0))

    task = AttributionTask(loss_func=margin_fn, model=model, checkpoints=model.state_dict(), target_func=margin_fn)
    n_params = sum(p.numel() for p in model.parameters())
    attributor = TRAKAttributor(task, correct_probability_func=prob_fn,
                                projector_kwargs={"proj_dim": k, "device": device.type},
                                regularization=regularization / n_params, device=device.type)
    train = DataLoader(TensorDataset(ds.x_train, ds.y_train), batch_size=64, shuffle=False)
    test = DataLoader(TensorDataset(ds.x_test[:n_test], ds.y_test[:n_test]), batch_size=64, shuffle=False)
    t0 = time.perf_counter()
    attributor.cache(train)
    cache_s = time.perf_counter() - t0
    scores = attributor.attribute(test).cpu()
    return scores, cache_s, time.perf_counter() - t0 - cache_s


RUNS = (  # label, projection, proj_dtype (kron: the kernel's precision), dampings (None: c = 1 only)
    ("dense", "dense", "bfloat16", None), ("dense-fp32", "dense", "float32", None),
    ("kron", "kron", "bfloat16", None), ("kron-fp32", "kron", "float32", None),
    ("kron-grid", "kron", "bfloat16", DAMPING_GRID))
SKIP = ("base_train_s", "load_s", "finetune_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--k", type=int, default=2048, help="projection dimension k")
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-dattri", action="store_true")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense runs (Kronecker only)")
    parser.add_argument("--lds", action="store_true", help="also the LDS of each score matrix and the serving seconds "
                                                         "of `run` (trains the ground truth if it is not stored)")
    parser.add_argument("--seeds", type=int, default=0, help="LDS of dense and Kronecker over this many projection seeds")
    args = parser.parse_args()
    task, device = get_task(args.task), resolve_device(args.device)
    ds = load_dataset(task.dataset)
    store = Store()
    base = load_or_train(task, [0], store=store, device=device, dataset=ds)[0]
    checkpoint = store.load(CHECKPOINT_KIND, base.key)
    n_test = min(args.n_test, ds.n_test)
    n_params = sum(p.numel() for p in base.model.parameters())
    print(f"{task.name}: {ds.n_train} train / {n_test} test, {n_params:,} parameters, k={args.k}, on "
          f"{describe_device(device)}, {torch.get_num_threads()} threads, load average {load_average()}")
    limits = matmul_limits(device)
    print(limit_line(limits))

    def fresh_run(proj: str, dtype: str, seed: int = 0, dampings=None):  # noqa: ANN001, ANN202
        """TRAK on a temporary store holding only the checkpoint (nothing served from a feature cache)."""
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Store(tmp)
            fresh.save(CHECKPOINT_KIND, base.key, checkpoint.tensors, checkpoint.meta)
            return attribute(task, MethodSpec("trak", proj, proj_dim=args.k, proj_dtype=dtype, seed=seed),
                             EnsembleSpec(), store=fresh, device=str(device), test_positions=torch.arange(n_test),
                             dampings=dampings)

    if args.seeds:
        print_seed_spread(task, ds, store, device, n_test, args.seeds, fresh_run)
    if not args.no_dense:
        print_dense_kernels(n_params, args.k, device, limits)
    results = {}
    for label, proj, dtype, dampings in RUNS:
        if args.no_dense and proj == "dense":
            continue
        r = fresh_run(proj, dtype, dampings=dampings)
        results[label] = r
        parts = ", ".join(f"{name} {s:.2f}" for name, s in r.costs.breakdown.items() if name not in SKIP)
        print(f"ours {label:10s}: {r.costs.serve_now_s:7.2f} s per member   ({parts})")
        print(f"    {label:10s}  {kernel_rates(r, ds.n_train, n_test, n_params, args.k, device, limits)}")
    if "dense" in results:
        print(f"dense vs dense-fp32 scores: {agreement(results['dense'].scores, results['dense-fp32'].scores)}")
        print(f"kron vs dense scores: {agreement(results['kron'].scores, results['dense'].scores)}")
    print(f"kron vs kron-fp32 scores: {agreement(results['kron'].scores, results['kron-fp32'].scores)}, "
          f"relative difference {relative(results['kron'].scores, results['kron-fp32'].scores):.1e}")
    member_s = results["kron"].costs.serve_now_s
    print(f"Kronecker member: {member_s:.3f} s at c = 1, {results['kron-grid'].costs.serve_now_s:.3f} s with the "
          f"{len(DAMPING_GRID)}-value damping grid of `run`")
    floor_s, floor_batch = forward_backward_floor(base.model, task, ds, device)
    print(f"floor          : {floor_s:7.2f} s   (one forward + backward over all {ds.n_train} training examples, "
          f"batches of {floor_batch})")
    print("per member / floor: " + ", ".join(f"{label} {r.costs.serve_now_s / floor_s:.1f}x"
                                            for label, r in results.items()))
    both_s = floor_s * (ds.n_train + n_test) / ds.n_train
    print(f"floor of both splits: {both_s:6.2f} s   (the floor's rate over the {ds.n_train} training and {n_test} test "
          f"examples a member differentiates); kron member / it: {member_s / both_s:.1f}x")

    scores = {label: r.scores for label, r in results.items() if label != "kron-grid"}
    if not args.no_dattri:
        theirs = dattri_run(base, ds, n_test, args.k, device, results)
        if theirs is not None:
            scores["dattri"] = theirs
    if args.lds:
        print_lds(task, ds, store, device, scores, n_test)
        print_run_serving(task, ds, store, device, member_s, results["kron-grid"].costs.serve_now_s)
    print(f"load average after: {load_average()}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def kernel_rates(r, n_train: int, n_test: int, n_params: int, k: int, device: torch.device,  # noqa: ANN001
                 limits: dict[str, float]) -> str:
    """Achieved GFLOP/s of a member's matrix products: dense projection, kernel Phi^T Phi, score products."""
    b, products = r.costs.breakdown, kernel_dtype(r.method, device)
    parts = []
    if r.method.proj == "dense" and b.get("project_s"):
        flops = 2 * (n_train + n_test) * n_params * k
        parts.append(f"projection {rate(flops, b['project_s'], limits, r.method.proj_dtype)}")
    if b.get("kernel_s"):
        parts.append(f"kernel {rate(2 * n_train * k * k, b['kernel_s'], limits, products)}")
    if b.get("product_s"):
        flops = 2 * n_train * k * n_test * (len(r.scores_by_damping) or 1)
        parts.append(f"score products {rate(flops, b['product_s'], limits, products)}")
    return "; ".join(parts)


def print_dense_kernels(n_params: int, k: int, device: torch.device, limits: dict[str, float]) -> None:
    """The dense projection's product [B, params] @ [params, k] for candidate chunk sizes, dtypes and thread counts,
    measured now; prints each rate, the fastest, and what the code uses."""
    chunk = DenseJL.chunk_rows(n_params)
    threads = torch.get_num_threads()
    candidates = [(rows, "bfloat16", t) for rows in (256, 512, 1024, 2048) for t in sorted({1, threads})]
    candidates.append((1024, "float32", threads))
    matrix = {dtype: torch.randn(n_params, k, device=device).to(getattr(torch, dtype))
              for dtype in ("bfloat16", "float32")}
    grads = torch.randn(max(rows for rows, _, _ in candidates), n_params, device=device)
    measured = {}
    try:
        for rows, dtype, t in candidates:
            torch.set_num_threads(t)
            g = grads[:rows].to(getattr(torch, dtype))
            g @ matrix[dtype]  # warm-up
            seconds = []
            for _ in range(3):  # the median of three: one call alone was seen to be off by 1.8x
                t0 = time.perf_counter()
                g @ matrix[dtype]
                seconds.append(time.perf_counter() - t0)
            measured[rows, dtype, t] = 2 * rows * n_params * k / sorted(seconds)[1] / 1e9
    finally:
        torch.set_num_threads(threads)
    print("dense projection product [B, params] @ [params, k], GFLOP/s measured now (median of 3): " + ", ".join(
        f"B={rows} {dtype} {t}t {g:,.0f}" for (rows, dtype, t), g in measured.items()))
    best = max(measured, key=measured.get)
    print(f"dense kernel: fastest now B={best[0]} {best[1]} {best[2]} thread(s); the code uses B={chunk} bfloat16 "
          f"(default) {threads} thread(s) ({measured.get((chunk, 'bfloat16', threads), float('nan')):,.0f} GFLOP/s "
          f"here, {limits['bfloat16']:,.0f} for the bfloat16 matmul limit)")


def dattri_run(base, ds, n_test: int, k: int, device: torch.device, results: dict):  # noqa: ANN001, ANN201
    """dattri's TRAK on the same checkpoint at our c = 1; prints its seconds and each ratio. None if not installed."""
    try:
        import dattri  # noqa: F401
    except ImportError:
        print("dattri is not installed (pip install -r requirements-dev.txt); skipping the peer run")
        return None
    from tda_core.features import GradientSource, all_param_names, compute_features

    src = GradientSource(base.model, all_param_names(base.model), False)
    sample = compute_features(src, ds.x_train[:500], ds.y_train[:500], device=device).phi
    lam = float((sample * sample).sum()) * ds.n_train / len(sample) / k  # our lambda at c = 1
    os.environ["TQDM_DISABLE"] = "1"  # dattri's progress bars
    theirs, cache_s, attr_s = run_dattri(base.model, ds, n_test, k, lam, device)
    total = cache_s + attr_s
    print(f"dattri          : {total:7.2f} s per member   (cache {cache_s:.2f}, attribute {attr_s:.2f})")
    for label, r in results.items():
        print(f"speed-up {label:10s} vs dattri: {total / r.costs.serve_now_s:6.1f}x   "
              f"agreement {agreement(r.scores, theirs)}")
    return theirs


def print_run_serving(task, ds, store: Store, device: torch.device,  # noqa: ANN001
                      member_s: float, grid_s: float) -> None:
    """`run` (damping tuned over the grid) from a store holding only the checkpoints and the ground truth: its
    serve_s per member against the benchmark's member figures."""
    from tda_core.evaluation import GROUND_TRUTH_KIND, ground_truth
    from tda_core.experiments import run
    from tda_core.specs import EvalSpec

    truth = ground_truth(task, EvalSpec(), store=store, device=device, dataset=ds)
    bases = load_or_train(task, [0, 1], store=store, device=device, dataset=ds)
    for ensemble in (EnsembleSpec(), EnsembleSpec("dropout", I=1, D=5), EnsembleSpec("naive", I=2)):
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Store(tmp)
            for b in bases:
                art = store.load(CHECKPOINT_KIND, b.key)
                fresh.save(CHECKPOINT_KIND, b.key, art.tensors, art.meta)
            art = store.load(GROUND_TRUTH_KIND, truth.key)
            fresh.save(GROUND_TRUTH_KIND, truth.key, art.tensors, art.meta)
            result = run(task, MethodSpec("trak", "kron", damping=None), ensemble, store=fresh, device=str(device),
                         truth=truth)
        per = result.costs.serve_s / result.costs.n_members
        print(f"run {ensemble.kind} I={ensemble.I} D={ensemble.D}: serve_s {result.costs.serve_s:.2f} s, {per:.3f} s "
              f"per member = {per / member_s:.2f}x the member at c = 1, {per / grid_s:.2f}x the member with the grid "
              f"(LDS {result.lds:.3f}, c = {result.damping})")


def forward_backward_floor(model: torch.nn.Module, task, ds, device: torch.device,
                           batches: tuple[int, ...] = (32, 64, 128, 256)) -> tuple[float, int]:
    """(seconds, batch size) of the fastest forward + backward pass of the attribution target over every training
    example in batches (parameter gradients summed over the batch, as in training)."""
    from tda_core.objectives import target

    model = model.to(device).eval()
    best = (float("inf"), 0)
    for batch in batches:
        t0 = time.perf_counter()
        for start in range(0, ds.n_train, batch):
            x, y = ds.x_train[start:start + batch].to(device), ds.y_train[start:start + batch].to(device)
            model.zero_grad(set_to_none=True)
            target(model(x), y, task.sequence).sum().backward()
        best = min(best, (time.perf_counter() - t0, batch))
    model.zero_grad(set_to_none=True)
    return best


def print_seed_spread(task, ds, store: Store, device: torch.device, n_test: int, seeds: int, fresh_run) -> None:
    """LDS (c = 1) of dense and Kronecker TRAK for projection seeds 0..seeds-1, with mean and spread."""
    import statistics

    if n_test != ds.n_test:
        print("LDS needs every test example (--n-test at its default); seed spread skipped")
        return
    for label, proj in (("dense", "dense"), ("kron", "kron")):
        values = []
        for seed in range(seeds):
            scores = {f"{label} seed {seed}": fresh_run(proj, "bfloat16", seed).scores}
            values.append(print_lds(task, ds, store, device, scores, n_test)[0])
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"LDS {label} over {seeds} projection seeds: mean {statistics.mean(values):.3f}, sd {spread:.3f}")


def print_lds(task, ds, store: Store, device: torch.device, scores: dict[str, torch.Tensor],
              n_test: int) -> list[float]:
    """LDS (M = 50 ground truth, evaluation split of the test set) of each score matrix, same damping c = 1."""
    from tda_core.evaluation import ground_truth, lds_against
    from tda_core.experiments import validation_split
    from tda_core.specs import EvalSpec

    if n_test != ds.n_test:
        print("LDS needs every test example (--n-test at its default); skipped")
        return []
    spec = EvalSpec()
    truth = ground_truth(task, spec, store=store, device=device, dataset=ds)
    _, evaluation = validation_split(ds.n_test, spec.seed)
    means = []
    for label, s in scores.items():
        result = lds_against(s[:, evaluation], truth, evaluation)
        print(f"LDS {label:10s}: {result.mean:.3f} +- {result.sem:.3f}   (c = 1, {len(evaluation)} test examples)")
        means.append(result.mean)
    return means


if __name__ == "__main__":
    main()
