"""Invalid hyperparameters raise ValueError at construction, naming the
argument and the value received."""

import pytest

from keras_adamp import SGDP
from keras_adamp import AdamP

INVALID = [
    (AdamP, {"learning_rate": -0.1}, "learning_rate", "-0.1"),
    (SGDP, {"learning_rate": -1.0}, "learning_rate", "-1.0"),
    (AdamP, {"epsilon": -1e-8}, "epsilon", "-1e-08"),
    (SGDP, {"epsilon": -1.0}, "epsilon", "-1.0"),
    (AdamP, {"delta": -0.1}, "delta", "-0.1"),
    (SGDP, {"delta": -0.5}, "delta", "-0.5"),
    (AdamP, {"weight_decay": -0.01}, "weight_decay", "-0.01"),
    (SGDP, {"weight_decay": -1e-4}, "weight_decay", "-0.0001"),
    (AdamP, {"beta_1": 1.0}, "beta_1", "1.0"),
    (AdamP, {"beta_1": -0.1}, "beta_1", "-0.1"),
    (AdamP, {"beta_2": 1.0}, "beta_2", "1.0"),
    (AdamP, {"beta_2": 1.5}, "beta_2", "1.5"),
    (SGDP, {"momentum": 1.0}, "momentum", "1.0"),
    (SGDP, {"momentum": -0.9}, "momentum", "-0.9"),
    (SGDP, {"dampening": 1.0}, "dampening", "1.0"),
    (SGDP, {"dampening": -0.1}, "dampening", "-0.1"),
    (AdamP, {"wd_ratio": 1.5}, "wd_ratio", "1.5"),
    (SGDP, {"wd_ratio": -0.1}, "wd_ratio", "-0.1"),
    (AdamP, {"delta": float("nan")}, "delta", "nan"),
    (AdamP, {"beta_1": "0.9"}, "beta_1", "'0.9'"),
    (SGDP, {"nesterov": True, "momentum": 0.0}, "nesterov", "momentum=0.0"),
    (
        SGDP,
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        "nesterov",
        "dampening=0.1",
    ),
    (AdamP, {"channel_axes": [("kernel", -1)]}, "channel_axes", "kernel"),
    (AdamP, {"channel_axes": {"kernel": "last"}}, "channel_axes", "last"),
    (AdamP, {"channel_axes": {"(": -1}}, "channel_axes", "("),
]


@pytest.mark.parametrize(
    "cls, kwargs, name, shown",
    INVALID,
    ids=[
        f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
        for c, kw, _, _ in INVALID
    ],
)
def test_invalid_hyperparameter_raises_value_error_naming_it(cls, kwargs, name, shown):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert name in message and shown in message, message


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (AdamP, {"beta_1": 0.0, "beta_2": 0.0, "wd_ratio": 1.0, "delta": 0.0}),
        (AdamP, {"learning_rate": 0.0, "weight_decay": 0.0, "wd_ratio": 0.0}),
        (SGDP, {"momentum": 0.0, "dampening": 0.0, "wd_ratio": 1.0}),
        (SGDP, {"momentum": 0.99, "nesterov": True, "learning_rate": 1}),
        (AdamP, {"weight_decay": None}),
    ],
)
def test_boundary_values_are_accepted(cls, kwargs):
    cls(**kwargs)


def test_import_without_a_keras_backend_says_how_to_install_one():
    # `pip install .` alone brings Keras but no backend, and `import keras`
    # then fails deep inside Keras; ours must say what to install.
    import subprocess
    import sys

    code = "import sys; sys.modules['keras'] = None; import keras_adamp"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "pip install tensorflow" in result.stderr
    assert "KERAS_BACKEND" in result.stderr
