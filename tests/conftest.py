"""Shared fixtures: every test gets its own empty artifact store and data directory."""
from __future__ import annotations

import pytest
import torch

from tda_core.store import Store


@pytest.fixture(autouse=True)
def _isolated_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("TDA_DATA_DIR", str(tmp_path / "data"))
    torch.manual_seed(0)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def user_registries():
    """Tasks, datasets and models registered by the test are gone after it (user-task tests)."""
    from tda_core.data.base import REGISTRY
    from tda_core.models import MODELS
    from tda_core.tasks import TASKS
    from tda_core.user_tasks import ORIGINS, _tasks_files

    saved = [(registry, dict(registry)) for registry in (TASKS, REGISTRY, MODELS, ORIGINS, _tasks_files)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)
