import os

import pytest

# In CI the oracle (torch + the official `adamp`) must be there: a missing
# install then fails the run instead of silently skipping the parity tests.
REQUIRE_ORACLE = os.environ.get("KERAS_ADAMP_REQUIRE_ORACLE") == "1"


@pytest.fixture(scope="session")
def oracle():
    """The official PyTorch implementation: (torch, adamp)."""
    try:
        import adamp
        import torch
    except ImportError as error:
        if REQUIRE_ORACLE:
            pytest.fail(
                f"KERAS_ADAMP_REQUIRE_ORACLE=1 but the oracle is missing: {error}"
            )
        pytest.skip(f"oracle not installed ({error}); pip install '.[test]'")
    torch.set_num_threads(1)
    return torch, adamp


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "tensorflow_only: needs the TensorFlow backend (tf.distribute, "
        "IndexedSlices, tf.function); skipped with a reason on JAX and torch.",
    )


def pytest_collection_modifyitems(config, items):
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(
        reason=f"TensorFlow-only feature; KERAS_BACKEND={backend}"
    )
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)
