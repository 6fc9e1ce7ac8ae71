"""Store keys are the user's cache: a refactor that silently re-keys them would recompute (or orphan) every
checkpoint, feature set, score matrix and ground truth. These keys were recorded before the registry refactor
and must not change unless a deliberate format change says so here."""
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
    "scores": ["1212915b45a1f446c1f432e7", "3537d573aab11d1d4fc8ea7c", "8ac0f2ab096b48a301cde618",
               "a08228d6dff78471cf1b75e5", "a38ff9f175ff46f61f06f7d4", "ceeb4eee7604c62509178fdb",
               "fa622787077f8af3995a5975"],
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
                       cpu) == "4481b5d4ddf3623143da2bbc"
    assert setting_key(TINY, MethodSpec("grad-dot", "dense"), EnsembleSpec("naive", I=1), EvalSpec(),
                       cpu) == "9e7aac5c51874f102eee475a"
