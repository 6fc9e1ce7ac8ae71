"""Store keys are the user's cache: a refactor that silently re-keys them would recompute (or orphan) every
checkpoint, feature set, score matrix and ground truth. These keys were recorded before the registry refactor
and must not change unless a deliberate format change says so here.

Deliberate change (issue 19, serving): TRAK and IF on projected features with the default bfloat16 `proj_dtype`
now form their kernel and score products in bfloat16 with float32 sums on a CPU (LDS unchanged: within 0.0003 of
a float64 solve at every c of the damping grid on embedded MNIST), so their score matrices and result rows carry
the entry `kernel_dtype` and were re-keyed; float32 and exact-gradient runs, Grad-Dot and all features kept theirs."""
from __future__ import annotations

import dataclasses

import torch

from tda_core.attribution import attribute
from tda_core.evaluation import ground_truth
from tda_core.experiments import setting_key
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe
from tda_core.tasks import get_task

TINY = dataclasses.replace(get_task("digits-mlp"), recipe=Recipe(epochs=2, batch_size=64, lr=0.01))
RUNS = [
    (MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec("dropout", I=1, D=2)),
    (MethodSpec("trak", "dense", proj_dim=64), EnsembleSpec("naive", I=1)),
    (MethodSpec("trak", "dense", proj_dim=64, proj_dtype="float32"), EnsembleSpec("naive", I=1)),
    (MethodSpec("if", "kron", proj_dim=64), EnsembleSpec("naive", I=1)),
    (MethodSpec("grad-dot", "none"), EnsembleSpec("lora", I=1, L=1, lora_epochs=1)),
    (MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec("dropout-forward", I=1, D=2)),
    (MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec("proj-seeds", I=1, P=2)),
]
PINNED = {
    "checkpoints": ["1f838b9861472d594df7ba20"],
    "features": ["060bc4d6732993f31293d87b", "1041505284bb139707b2ec7d", "27168a153b83c88132a3a1f4",
                 "4bc223f8436c4300f805b369", "4ea384f345b18f43afeb97d9", "65f2ccec38ead6a11ab590b6",
                 "ae89309faf65f3124ae88bce", "d3c416ebbd3e7d3ac3d2a589"],
    "scores": ["0acbca64bb4d79d68a734615", "1212915b45a1f446c1f432e7", "735a970f0c2aeec38952572a",
               "7c85b61b67257cbb96cc396b", "8ac0f2ab096b48a301cde618", "9af97f97affde1af9754328e",
               "fdfc37fed993dc0764686bf0"],
    "adapters": ["19278ae1277aad6534356699"],
    "ground_truth": ["91ccb541bc96c4c6b78e1b1a"],
    "ground_truth_models": ["23678d453349f094ab4ee5ca", "eb58be23e39156481d532b65"],
}


def test_artifacts_keep_their_store_keys(store):
    for method, ensemble in RUNS:
        attribute(TINY, method, ensemble, store=store, device="cpu", test_positions=torch.arange(4))
    ground_truth(TINY, EvalSpec(M=2, alpha=0.5), store=store, device="cpu")
    assert {kind: store.keys(kind) for kind in PINNED} == PINNED


def test_results_rows_keep_their_setting_keys():
    cpu = torch.device("cpu")
    assert setting_key(TINY, MethodSpec("trak", "kron", damping=None), EnsembleSpec("dropout", I=2, D=5), EvalSpec(),
                       cpu) == "ba2dfff0aec89f61c56654ab"
    assert setting_key(TINY, MethodSpec("grad-dot", "dense"), EnsembleSpec("naive", I=1), EvalSpec(),
                       cpu) == "9e7aac5c51874f102eee475a"
