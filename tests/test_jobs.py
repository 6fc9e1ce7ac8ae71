"""Background jobs: real worker processes computing real artifacts into a store, seen from other callers.

Every test starts `python -m tda_core.jobs` workers on a tiny digits task (2 epochs), so the work is seconds.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import torch

from tda_core import jobs, tasks
from tda_core.attribution import attribute
from tda_core.errors import UserError
from tda_core.evaluation import ground_truth, missing_models
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe
from tda_core.store import Store

TIMEOUT = 240


def tiny(epochs: int = 2):
    return dataclasses.replace(tasks.get_task("digits-mlp"), recipe=Recipe(epochs=epochs, batch_size=64, lr=0.05))


def wait_for(predicate, timeout: float = TIMEOUT, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("condition not met in time")


def test_a_job_runs_in_a_worker_and_a_second_caller_attaches(store):
    task, spec = tiny(), EvalSpec(M=4)
    job = jobs.ground_truth_job(task, spec)
    first = jobs.start(job, store)
    second = jobs.start(jobs.ground_truth_job(tiny(), EvalSpec(M=4)), store)  # built anew: same work, same job
    assert second.job_id == first.job_id and second.pid == first.pid and first.pid != os.getpid()
    done = jobs.wait(store, first.job_id, TIMEOUT)
    assert done.status == "done", done.message
    assert done.stages[0][0] == "ground-truth models" and done.stages[0][1:] == (4, 4)
    assert missing_models(task, spec, store=store) == 0  # the worker's artifacts, read by this process
    assert ground_truth(task, spec, store=store).targets.shape[:2] == (4, 1)
    assert [s.job_id for s in jobs.all_jobs(store)] == [first.job_id] and not jobs.active_jobs(store)


def test_job_ids_come_from_what_a_job_computes():
    a = jobs.ground_truth_job(tiny(), EvalSpec(M=4))
    assert a.job_id == jobs.ground_truth_job(tiny(), EvalSpec(M=4)).job_id
    assert a.job_id != jobs.ground_truth_job(tiny(), EvalSpec(M=5)).job_id
    assert a.job_id != jobs.ground_truth_job(tiny(epochs=3), EvalSpec(M=4)).job_id
    task = jobs.task_from_json(a.params["task"])
    assert task == tiny()  # the full spec travels, so the worker computes under the caller's store keys
    with pytest.raises(UserError, match="unknown job kind"):
        jobs.start(jobs.JobSpec("nope", {}, "x"), Store())


def test_an_attribution_job_stores_what_attribute_would_compute(store):
    task, method, ensemble = tiny(), MethodSpec("trak", proj="kron", proj_dim=256), EnsembleSpec("dropout", I=1, D=2)
    job = jobs.attribute_job(task, [(method, ensemble)], "attributing", members=[(method, ensemble)])
    assert jobs.wait(store, jobs.start(job, store).job_id, TIMEOUT).status == "done"
    from tda_core.attribution import member_attribution, members_stored, scores_stored

    assert scores_stored(task, method, ensemble, store) and members_stored(task, method, ensemble, store)
    stored = attribute(task, method, ensemble, store=store)
    assert stored.costs.from_store  # read, not recomputed
    torch.testing.assert_close(member_attribution(task, method, ensemble, store=store).average(), stored.scores)


def test_a_user_error_in_a_job_is_reported_as_its_message(store):
    job = jobs.attribute_job(tiny(), [(MethodSpec("grad-dot"), EnsembleSpec("dropout-forward", I=1, D=2))], "bad")
    done = jobs.wait(store, jobs.start(job, store).job_id, TIMEOUT)
    assert done.status == "failed"
    assert "dropout-forward would compute exactly the naive member" in done.message


def test_cancel_stops_the_worker_and_leaves_the_store_consistent(store):
    task, spec = tiny(epochs=400), EvalSpec(M=30)  # long enough to be stopped half-way
    job = jobs.start(jobs.ground_truth_job(task, spec), store)
    wait_for(lambda: any(label.startswith("train") and done >= 1
                         for label, done, _ in jobs.status(store, job.job_id).stages))
    stopped = jobs.cancel(store, job.job_id)
    assert stopped.status == "cancelled" and not stopped.active
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)
    assert not list(store.root.rglob("*.tmp"))  # no half-written file left behind
    for record in store.root.rglob("*.json"):  # every artifact that is there is whole
        kind, key = record.parent.name, record.stem
        assert store.load(kind, key) is not None, record
    assert missing_models(task, spec, store=store) == 30  # its one chunk of 30 models was stopped: none stored
    restarted = jobs.start(jobs.ground_truth_job(task, spec), store)  # a new start runs again
    assert restarted.active and restarted.pid != job.pid
    assert jobs.cancel(store, restarted.job_id).status == "cancelled"


def test_a_worker_that_dies_unreported_is_seen_as_failed(store):
    job = jobs.start(jobs.ground_truth_job(tiny(epochs=400), EvalSpec(M=30)), store)
    wait_for(lambda: jobs.status(store, job.job_id).status == "running")
    os.killpg(job.pid, signal.SIGKILL)  # no chance to report
    failed = wait_for(lambda: (s := jobs.status(store, job.job_id)).status == "failed" and s)
    assert "ended without reporting" in failed.message and str(jobs.log_path(store, job.job_id)) in failed.message
