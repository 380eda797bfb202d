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
