"""The open product: the public API, the attributor object, your own model / image folder / tasks file,
and any tool's scores on our ground truth (score files, the exported ground truth, dattri's LDS)."""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

import tda_core
from tda_core import (
    EnsembleAttributor,
    EnsembleSpec,
    EvalSpec,
    MethodSpec,
    Recipe,
    Store,
    UserError,
    attribute,
    ground_truth,
    lds,
    load_user_tasks,
    register_image_folder,
    register_task,
    run,
)
from tda_core.cli import main
from tda_core.data import REGISTRY, load_dataset
from tda_core.data.image_folder import list_image_folder
from tda_core.models.dropout import MaskableDropout
from tda_core.tasks import TASKS, get_task, make_model
from tda_core.training import checkpoint_key
from tda_core.user_tasks import ORIGINS

X_DIGITS, Y_DIGITS = load_digits(return_X_y=True)
IMAGES = X_DIGITS.reshape(-1, 1, 8, 8) / 16.0
FAST = Recipe(epochs=3, batch_size=64, lr=0.05)
TINY = dataclasses.replace(get_task("digits-mlp"), recipe=Recipe(epochs=2, batch_size=64, lr=0.01))
CPU = torch.device("cpu")


def small_cnn(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Dropout(0.1), nn.Flatten(),
                         nn.Linear(width * 64, 10))


def register_digits(name: str, model_fn, n_train: int = 1500, recipe: Recipe = FAST, **kw):
    return register_task(name, model_fn, IMAGES[:n_train], Y_DIGITS[:n_train], IMAGES[1500:], Y_DIGITS[1500:],
                         recipe, **kw)


@pytest.fixture
def short_digits(monkeypatch):
    """digits-mlp trained for 2 epochs, so CLI commands run in seconds."""
    monkeypatch.setitem(TASKS, "digits-mlp", TINY)
    return TINY


# --- the public API ---------------------------------------------------------------------------------
def test_public_api_exports_documented_typed_objects():
    namespace: dict = {}
    exec("from tda_core import *", namespace)
    assert set(tda_core.__all__) <= set(namespace)
    assert {"TaskSpec", "EnsembleSpec", "MethodSpec", "EvalSpec", "Recipe", "Store", "plan", "attribute",
            "ground_truth", "lds", "run", "sweep", "compare", "register_task",
            "EnsembleAttributor"} <= set(tda_core.__all__)
    for name in tda_core.__all__:
        obj = getattr(tda_core, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isfunction(obj):
            assert inspect.signature(obj).return_annotation is not inspect.Signature.empty, name
    assert tda_core.attribute is tda_core.attribution.attribute
    assert tda_core.compare is tda_core.experiments.compare
    with pytest.raises(AttributeError):
        tda_core.no_such_name  # noqa: B018


# --- the attributor -----------------------------------------------------------------------------------
def test_attributor_equals_attribute_and_ranks_top_k(store, tmp_path):
    att = EnsembleAttributor(TINY, "trak", "dropout", I=2, D=2, proj="kron", proj_dim=64, store=store, device="cpu")
    assert att.fit() is att and att.fitted
    assert len(store.keys("checkpoints")) == 2 and len(store.keys("features")) == 4  # 2 models x 2 masks cached
    got = att.attribute([0, 3, 5])
    ref = attribute(TINY, MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec("dropout", I=2, D=2),
                    store=Store(tmp_path / "fresh"), device="cpu", test_positions=[0, 3, 5])
    assert not ref.costs.from_store
    assert got.scores.shape == (1500, 3)  # train x test
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=0)
    assert torch.equal(got.train_index, ref.train_index) and torch.equal(got.test_index, ref.test_index)

    top = att.top_k(3, k=4)
    column = att.attribute([3]).scores[:, 0]  # one column: equal to ref's up to the rounding of the bfloat16 score
    # products (float32 sums) on a CPU, which group the columns differently
    torch.testing.assert_close(column, ref.scores[:, 1], rtol=1e-2, atol=1e-3 * float(ref.scores[:, 1].abs().max()))
    best = torch.argsort(column, descending=True)[:4]
    assert top["train_position"].tolist() == best.tolist()
    assert top["source_index"].tolist() == ref.train_index[best].tolist()
    assert top["label"].tolist() == load_dataset("digits").y_train[best].tolist()
    np.testing.assert_allclose(top["score"], column[best].numpy())
    worst = att.top_k(3, k=2, opponents=True)
    assert worst["train_position"].tolist() == torch.argsort(column)[:2].tolist()
    with pytest.raises(UserError, match="unknown options lora_rnk"):
        EnsembleAttributor(TINY, "trak", "lora", lora_rnk=4)


# --- your own model and arrays --------------------------------------------------------------------
def test_user_cnn_on_digits_arrays_runs_with_lds(user_registries, store):
    task = register_digits("digits-cnn", small_cnn)
    assert get_task("digits-cnn") == task and ORIGINS["digits-cnn"] == "Python"
    model = make_model(task)
    assert [type(model.get_submodule(n)) for n in model.dropout_layers] == [MaskableDropout]  # nn.Dropout swapped
    assert model.lora_targets == ("0", "4")  # the Conv2d and the Linear layer
    result = run("digits-cnn", MethodSpec("trak", "kron", proj_dim=256, damping=1.0), EnsembleSpec("dropout", I=1, D=2),
                 EvalSpec(M=8), store=store, device="cpu")
    assert result.n_eval == 238 and result.lds > 0.1, result.lds  # 297 test examples less the validation split
    assert result.costs.n_members == 2
    lora = attribute("digits-cnn", MethodSpec("grad-dot", "kron", proj_dim=64), EnsembleSpec("lora", L=1, lora_epochs=1),
                     store=store, device="cpu", test_positions=[0, 1])
    assert lora.scores.shape == (1500, 2) and torch.isfinite(lora.scores).all()
    assert store.keys("adapters")


def test_user_task_store_keys_depend_on_data_and_model(user_registries):
    def key(task):
        return checkpoint_key(task, load_dataset(task.dataset), 0, None, CPU)

    first = register_digits("mine", small_cnn, n_train=300)
    keys = {key(first)}
    assert register_digits("mine", small_cnn, n_train=300) == first  # same data and model: same task, same keys
    wider = register_digits("mine", lambda: small_cnn(16), n_train=300)
    assert wider.dataset == first.dataset and wider.model != first.model
    keys.add(key(wider))
    other_data = register_digits("mine", lambda: small_cnn(16), n_train=400)
    assert other_data.dataset != wider.dataset and wider.dataset not in REGISTRY  # the replaced data is dropped
    keys.add(key(other_data))
    keys.add(key(register_digits("yours", lambda: small_cnn(16), n_train=400)))
    assert len(keys) == 4


class RandomForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x.flatten(1), 0.1, self.training))


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 4, batch_first=True)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x.reshape(len(x), 8, 8))[0][:, -1])


@pytest.mark.parametrize("model_fn, kw, message", [
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout2d(0.1), nn.Flatten(), nn.Linear(144, 10)), {},
     "layer '1' is Dropout2d: only element-wise nn.Dropout"),
    (GRUNet, {}, r"layer 'rnn' \(GRU\) is not supported: its per-sample gradients"),
    (RandomForward, {}, "draws random numbers in its forward pass outside nn.Dropout"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), {}, "at least 10 classes; on two examples it returned"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), {"lora_targets": ["fc"]}, "LoRA targets fc are not"),
    (lambda: nn.Linear(64, 10), {"name": "digits-mlp"}, "'digits-mlp' is a built-in task"),
])
def test_user_model_errors_name_the_cause(user_registries, model_fn, kw, message):
    options = dict(kw)
    name = options.pop("name", "bad")
    with pytest.raises(UserError, match=message):
        register_digits(name, model_fn, n_train=100, **options)
    assert "bad" not in TASKS and not any(m.startswith("bad@") for m in tda_core.models.MODELS)


def test_model_without_dropout_says_dropout_ensembles_are_unavailable(user_registries, store):
    register_digits("plain", lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), n_train=200,
                    recipe=Recipe(epochs=1, batch_size=64, lr=0.05))
    with pytest.raises(UserError, match="has no dropout layers; use --ensemble naive, lora or proj-seeds"):
        attribute("plain", MethodSpec("trak", "kron", proj_dim=32), EnsembleSpec("dropout", D=2), store=store,
                  device="cpu", test_positions=[0])
    naive = attribute("plain", MethodSpec("trak", "kron", proj_dim=32), EnsembleSpec(), store=store, device="cpu")
    assert naive.scores.shape == (200, 297)


def test_integer_inputs_stay_token_ids_for_embedding_models(user_registries, store):
    tokens = X_DIGITS.astype(np.int64)  # pixel intensities 0..16 as token ids

    def embed() -> nn.Module:
        return nn.Sequential(nn.Embedding(17, 4), nn.Flatten(), nn.Dropout(0.1), nn.Linear(256, 10))

    task = register_task("digit-tokens", embed, tokens[:300], Y_DIGITS[:300], tokens[1500:], Y_DIGITS[1500:],
                         Recipe(epochs=2, batch_size=64, lr=0.05))
    dataset = load_dataset(task.dataset)
    assert dataset.x_train.dtype == torch.int64 and dataset.kind == "features"
    scores = attribute(task, MethodSpec("trak", "kron", proj_dim=32), EnsembleSpec("dropout", D=2), store=store,
                       device="cpu", test_positions=[0, 1]).scores
    assert scores.shape == (300, 2) and torch.isfinite(scores).all()
    with pytest.raises(UserError, match=r"the model fails on two training examples of shape \(2, 1, 8, 8\) and dtype "
                                        "torch.float32"):
        register_digits("floats-into-embedding", embed, n_train=100)


# --- image folders and tasks files ----------------------------------------------------------------------
def write_pngs(folder, classes: dict[str, int], n: int, size: int = 10, mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for name, level in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.clip(rng.normal(level, 30, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode=mode).save(folder / name / f"{i:02d}.png")


def test_image_folder_becomes_a_task_with_the_corrupt_file_counted(user_registries, tmp_path, capsys, caplog):
    folder = tmp_path / "pets"
    write_pngs(folder, {"cat": 60, "dog": 190}, 12)
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    with caplog.at_level(logging.WARNING):
        assert main(["add-image-folder", str(folder), "--name", "pets", "--epochs", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["classes"] == "cat, dog" and row["train/test"] == "20/4" and row["image"] == "3x10x10"
    assert "1 unreadable file(s) skipped" in row["source"]
    assert "skipped 1 of 25 image files that could not be read (first: dog/broken.png" in caplog.text

    task = get_task("pets")
    dataset = load_dataset(task.dataset)
    broken = list_image_folder(folder).files.index("dog/broken.png")
    used = sorted(dataset.train_index.tolist() + dataset.test_index.tolist())
    assert used == [i for i in range(25) if i != broken]  # source index = position in the folder's file list
    assert dataset.y_test.tolist() == [0, 0, 1, 1] and dataset.x_train.max() <= 1.0

    assert main(["attribute", "--task", "pets", "--ensemble", "dropout", "--D", "2", "--proj", "kron",
                 "--proj-dim", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scores_shape"] == [20, 4]

    TASKS.pop("pets")  # as in a new process: the store's record registers it again
    ORIGINS.pop("pets")
    assert "pets" in load_user_tasks(store=Store())
    assert get_task("pets") == task
    assert main(["tasks", "--json"]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["pets"]["origin"] == f"image folder {folder}" and rows["digits-mlp"]["origin"] == "built-in"


def test_split_grey_folder_reads_size_channels_and_pixel_limit(user_registries, tmp_path, caplog):
    folder = tmp_path / "shapes"
    for split, n in (("train", 6), ("test", 2)):
        write_pngs(folder / split, {"circle": 50, "square": 200}, n, size=8, mode="L")
    write_pngs(folder / "train", {"circle": 50}, 1, size=12, mode="L", seed=1)  # overwrites circle/00.png, 12x12
    with caplog.at_level(logging.WARNING):
        task = register_image_folder("shapes", folder, max_pixels=100)
        dataset = load_dataset(task.dataset)
    assert dataset.x_train.shape[1:] == (1, 8, 8) and dataset.class_names == ("circle", "square")
    assert (dataset.n_train, dataset.n_test) == (11, 4)  # train/ and test/ kept; the 12x12 image is over the limit
    assert "skipped 1 of 16" in caplog.text and "12x12 pixels is over the limit of 100" in caplog.text
    with pytest.raises(UserError, match="needs one subfolder per class"):
        register_image_folder("empty", tmp_path / "shapes" / "train" / "circle")


def test_tasks_file_is_listed_and_its_errors_are_one_line(user_registries, tmp_path, capsys, monkeypatch):
    tasks_file = tmp_path / "my_tasks.py"
    tasks_file.write_text("from sklearn.datasets import load_digits\nfrom torch import nn\n"
                          "from tda_core import Recipe, register_task\n"
                          "x, y = load_digits(return_X_y=True)\n"
                          "register_task('digits-linear', lambda: nn.Sequential(nn.Linear(64, 10)), x[:1500] / 16, "
                          "y[:1500], x[1500:] / 16, y[1500:], Recipe(epochs=2, batch_size=64, lr=0.1))\n")
    assert main(["tasks", "--json", "--tasks-file", str(tasks_file)]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["digits-linear"]["origin"] == f"tasks file {tasks_file}"
    assert rows["digits-linear"]["recipe"] == "sgd lr 0.1, batch 64, 2 epochs"

    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\n\ny = x / 0\n")
    monkeypatch.setenv("TDA_TASKS_FILE", str(broken))
    assert main(["tasks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: tasks file {broken} line 3: ZeroDivisionError: division by zero"]


# --- any tool's scores on our ground truth --------------------------------------------------------
def test_score_files_give_the_lds_of_run_in_any_orientation(short_digits, tmp_path, capsys):
    ours = tmp_path / "ours.npz"
    assert main(["attribute", "--task", "digits-mlp", "--proj", "kron", "--proj-dim", "64", "--save-scores",
                 str(ours), "--json"]) == 0
    capsys.readouterr()
    reference = run(short_digits, MethodSpec("trak", "kron", proj_dim=64, damping=1.0), EnsembleSpec(), EvalSpec(M=6),
                    device="cpu")

    def lds_row(path, *extra) -> dict:
        assert main(["lds", "--task", "digits-mlp", "--scores", str(path), "--M", "6", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    row = lds_row(ours)
    assert (row["lds"], row["lds_sem"], row["n_eval"]) == (reference.lds, reference.lds_sem, reference.n_eval)
    assert row["n_scored"] == 297 and not row["transposed"]

    saved = np.load(ours)
    perm = np.random.default_rng(0).permutation(1500)  # rows in another order, test x train, as safetensors
    from safetensors.numpy import save_file
    flipped = tmp_path / "theirs.safetensors"
    save_file({"scores": np.ascontiguousarray(saved["scores"][perm].T), "train_index": saved["train_index"][perm],
               "test_index": saved["test_index"]}, str(flipped))
    row = lds_row(flipped)
    assert row["transposed"] and row["lds"] == pytest.approx(reference.lds, abs=1e-12)
    assert row["lds_sem"] == pytest.approx(reference.lds_sem, abs=1e-12)

    for arrays, message in [
        ({"scores": saved["scores"], "train_index": saved["train_index"]}, "lacks test_index"),
        ({"scores": saved["scores"][:, :10], "train_index": saved["train_index"], "test_index": saved["test_index"]},
         r"scores have shape \(1500, 10\) but the file holds 1500 train and 297 test"),
        ({"scores": saved["scores"], "train_index": saved["train_index"] + 5000, "test_index": saved["test_index"]},
         "1500 of the file's 1500 train source indices are not train examples of task digits-mlp"),
    ]:
        bad = tmp_path / "bad.npz"
        np.savez(bad, **arrays)
        assert main(["lds", "--task", "digits-mlp", "--scores", str(bad), "--M", "6"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err


def test_exported_ground_truth_and_dattri_lds_agree_with_ours(short_digits, tmp_path, capsys):
    from dattri.metric import lds as dattri_lds

    out = tmp_path / "gt.npz"
    assert main(["export-ground-truth", "--task", "digits-mlp", "--M", "6", "--out", str(out), "--json"]) == 0
    truth = ground_truth(short_digits, EvalSpec(M=6), device="cpu")  # read from the store
    dataset = load_dataset("digits")
    gt = np.load(out, allow_pickle=False)
    np.testing.assert_array_equal(gt["subset_positions"], truth.subsets.numpy())
    np.testing.assert_array_equal(gt["subsets"], dataset.train_index.numpy()[truth.subsets.numpy()])
    np.testing.assert_array_equal(gt["values"], truth.values.numpy())
    assert gt["targets"].shape == (6, 1, 297) and gt["subsets"].shape == (6, 750)
    assert sorted(np.concatenate([gt["validation_positions"], gt["evaluation_positions"]])) == list(range(297))
    assert json.loads(str(gt["meta"]))["M"] == 6

    scores = attribute(short_digits, MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec(), device="cpu").scores
    ours = lds(scores, gt["subset_positions"], gt["values"])
    theirs, _ = dattri_lds(scores, (torch.from_numpy(gt["values"]), torch.from_numpy(gt["subset_positions"])))
    np.testing.assert_allclose(ours.per_example, theirs.numpy(), atol=1e-6, equal_nan=True)
    assert ours.mean == pytest.approx(float(np.nanmean(theirs.numpy())), abs=1e-6) and ours.mean > 0.05
