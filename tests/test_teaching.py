"""Member scores and the teaching views' numbers: checked against the product's own attributions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tda_core import tasks
from tda_core.attribution import MemberAttribution, attribute, member_attribution, members_stored
from tda_core.data import load_dataset
from tda_core.errors import UserError
from tda_core.evaluation import ground_truth, lds_against
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe
from tda_core.teaching import (ensemble_ladder, growth_sizes, growth_summary, member_ranks, pixel_differences,
                               top_k_as_members_grow)

TRAK = MethodSpec("trak", proj="kron", proj_dim=512)


@pytest.fixture(scope="module")
def task():
    return dataclasses.replace(tasks.get_task("digits-mlp"), recipe=Recipe(epochs=2, batch_size=64, lr=0.05))


def test_members_average_to_the_ensemble_and_each_is_a_one_model_attribution(task, store):
    naive = EnsembleSpec("naive", I=2)
    assert not members_stored(task, TRAK, naive, store)
    members = member_attribution(task, TRAK, naive, store=store)
    assert members_stored(task, TRAK, naive, store) and members.labels == ["model seed 0", "model seed 1"]
    torch.testing.assert_close(members.average(), attribute(task, TRAK, naive, store=store).scores)
    alone = attribute(task, TRAK, EnsembleSpec("naive", I=1, seed=1), store=store).scores  # the second member
    torch.testing.assert_close(members.member(1), alone)
    dropout = member_attribution(task, TRAK, EnsembleSpec("dropout", I=1, D=3), store=store)
    first_two = attribute(task, TRAK, EnsembleSpec("dropout", I=1, D=2), store=store).scores
    torch.testing.assert_close(dropout.average(2), first_two)  # the first n members are the D = n ensemble
    again = member_attribution(task, TRAK, EnsembleSpec("dropout", I=1, D=3), store=store)  # a read
    torch.testing.assert_close(again.scores, dropout.scores)


def synthetic(columns: list[list[float]]) -> MemberAttribution:
    """Members whose score of training example i for the single test example is columns[member][i]."""
    scores = torch.tensor(columns, dtype=torch.float32)[:, :, None]
    return MemberAttribution([f"m{j}" for j in range(len(columns))], scores, None, 1.0, "key")


def test_member_ranks_put_each_members_rank_under_the_ensembles_top():
    members = synthetic([[5, 4, 3, 2, 1], [1, 2, 3, 4, 9], [5, 3, 4, 2, 1]])  # ensemble mean: 11/3, 3, 10/3, 8/3, 11/3
    ranks = member_ranks(members, 0, 3)
    assert list(ranks.columns) == [0, 4, 2]  # ties keep the training order
    assert ranks.loc["m0"].tolist() == [1, 5, 3]
    assert ranks.loc["m1"].tolist() == [5, 1, 3]
    assert ranks.loc["m2"].tolist() == [1, 5, 2]


def test_the_top_k_as_members_are_added():
    members = synthetic([[9, 1, 0, 0], [0, 1, 9, 8], [0, 1, 8, 9]])  # means of 2: 4.5 1 4.5 4; of 3: 3 1 5.7 5.7
    growth = top_k_as_members_grow(members, 0, 2, sizes=(1, 2))
    assert growth_sizes(3, (1, 2, 5, 10)) == [1, 2, 3]
    assert growth.groupby("members")["position"].apply(list).to_dict() == {1: [0, 1], 2: [0, 2], 3: [2, 3]}
    assert growth.loc[growth["members"] == 1, "in_final"].tolist() == [False, False]
    summary = growth_summary(members, 0, 2, sizes=(1, 2)).set_index("members")
    assert summary.loc[3, "shared with the full top-k"] == 2 and summary.loc[1, "shared with the full top-k"] == 0
    assert summary.loc[3, "Spearman with the full ensemble"] == pytest.approx(1.0)


def test_pixel_differences_are_test_minus_training_image():
    digits = load_dataset("digits")
    diffs = pixel_differences(digits, 0, [0, 1])
    assert diffs.shape == (2, 8, 8) and np.abs(diffs).max() <= 1.0
    want = (digits.image("test", 0).astype(float) - digits.image("train", 1).astype(float)) / 255.0
    np.testing.assert_allclose(diffs[1], want)
    with pytest.raises(UserError, match="need images"):
        pixel_differences(dataclasses.replace(digits, kind="music"), 0, [0])


def test_the_ensemble_ladder_is_lds_against_the_ground_truth(task, store):
    truth = ground_truth(task, EvalSpec(M=6), store=store)
    one = attribute(task, TRAK, EnsembleSpec("naive", I=1), store=store).scores
    two = attribute(task, TRAK, EnsembleSpec("naive", I=2), store=store).scores
    ladder = ensemble_ladder([("one", one), ("two", two)], truth)
    assert ladder["ensemble"].tolist() == ["one", "two"]
    assert ladder["LDS"].tolist() == [round(lds_against(s, truth).mean, 3) for s in (one, two)]


def test_member_views_read_the_chosen_test_example():
    scores = torch.tensor([[[5.0, 1.0], [1.0, 5.0], [3.0, 3.0]], [[4.0, 2.0], [2.0, 6.0], [1.0, 1.0]]])
    members = MemberAttribution(["m0", "m1"], scores, torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 2.0]]), 1.0, "k")
    torch.testing.assert_close(members.average(), (scores.mean(0)) * torch.tensor([1.0, 0.75, 1.5])[:, None])
    ranks = member_ranks(members, 1, 2)  # test example 1: ensemble 2.25, 4.125, 3.0 -> positions 1, 2
    assert list(ranks.columns) == [1, 2]
    assert ranks.loc["m0"].tolist() == [2, 1] and ranks.loc["m1"].tolist() == [1, 2]  # m0 alone: 1, 2.5, 3
    assert top_k_as_members_grow(members, 1, 1, sizes=(1,))["position"].tolist() == [2, 1]
    with pytest.raises(UserError, match="test position 2 is out of range"):
        member_ranks(members, 2, 1)
