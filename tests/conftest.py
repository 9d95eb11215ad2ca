"""Shared fixtures: one Ray cluster per test session, tiny configs in one place."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from sidforge.platform.runtime import quiet_env  # noqa: E402

quiet_env()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sidforge.platform.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for the whole session (start-up costs ~7 s)."""
    import ray

    from sidforge.platform.runtime import init_ray

    init_ray(num_cpus=2, object_store_mb=1024, extra_resources={"train_driver": 8})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data directory; tests that need it are skipped when it is absent."""
    value = os.environ.get("SIDFORGE_DATA_DIR")
    if not value or not Path(value, "amazon-beauty-2014").is_dir():
        pytest.skip("benchmark data not available (set SIDFORGE_DATA_DIR)")
    return Path(value)


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Factory: configs/tiny.yaml with its run directory under ``tmp_path``, plus overrides."""

    def make(*overrides: str) -> Config:
        return load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture
def one_torch_thread():
    """Tiny tensors on a busy 2-core machine: one intra-op thread avoids OpenMP spin-wait."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
