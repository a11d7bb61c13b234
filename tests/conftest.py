import pytest
import torch

from zsq.paths import shared_data_dir


@pytest.fixture
def shared_data():
    """The shared data folder; the test is skipped where it is absent (set ZSQ_SHARED_DATA)."""
    path = shared_data_dir()
    if not (path / "weights").is_dir():
        pytest.skip(f"shared data not found at {path} (set ZSQ_SHARED_DATA)")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
