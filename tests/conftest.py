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


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test (`policy("mixed_float16")`),
    and always restores the previous one."""
    import keras

    previous = keras.config.dtype_policy()
    try:
        yield keras.config.set_dtype_policy
    finally:
        keras.config.set_dtype_policy(previous)


# marker -> the one backend its tests need, and why the others can't run them.
BACKEND_MARKERS = {
    "tensorflow_only": (
        "tensorflow",
        "needs the TensorFlow backend (tf.distribute, IndexedSlices, tf.function)",
    ),
}


def pytest_configure(config):
    # Used by Keras's own tests, which test_keras_conformance.py runs; every
    # backend here trains, so it selects nothing.
    config.addinivalue_line(
        "markers", "requires_trainable_backend: Keras's marker (not numpy)."
    )
    for marker, (_, why) in BACKEND_MARKERS.items():
        config.addinivalue_line(
            "markers", f"{marker}: {why}; skipped with a reason on the others."
        )


def pytest_collection_modifyitems(config, items):
    import keras

    backend = keras.backend.backend()
    for marker, (needed, why) in BACKEND_MARKERS.items():
        if needed == backend:
            continue
        skip = pytest.mark.skip(reason=f"{why}; KERAS_BACKEND={backend}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
