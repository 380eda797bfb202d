"""examples/finetune_hub.py runs offline for a few steps: a tiny BERT text
classifier (full and LoRA) and a tiny ViT image classifier with AdamP and
`channel_axes_for`, and, on JAX, the BERT one under ModelParallel."""

import importlib.util
import os
import re
import warnings

import keras
import numpy as np
import pytest

pytest.importorskip("keras_hub")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune_hub.py")
FEW_STEPS = ["--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "16"]
FINAL = re.compile(
    r"final: (text|image) adamp accuracy ([0-9.]+) on (\d+) held-out examples, "
    r"trained in ([0-9.]+) s"
)

pytestmark = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="the example's offline runs are tested on TensorFlow and JAX",
)


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_hub", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv, capsys):
    with warnings.catch_warnings():
        # channel_axes_for and the optimizers must not warn on these models.
        warnings.filterwarnings("error", module="keras_adamp")
        warnings.filterwarnings("error", message=".*channel")
        result = load_example().main(argv)
    out = capsys.readouterr().out
    match = FINAL.search(out.strip().splitlines()[-1])
    assert match, out
    assert 0.0 <= float(match.group(2)) <= 1.0
    return result, out


@pytest.mark.parametrize("lora", [0, 2], ids=["full", "lora"])
def test_text_classifier_fine_tunes_offline(lora, capsys):
    argv = [*FEW_STEPS, "--examples", "128", "--verbose", "0"]
    result, out = run([*argv, "--lora", str(lora)] if lora else argv, capsys)
    model = result["model"]
    assert "BertTextClassifier on text" in out
    assert int(model.optimizer.iterations) == 3
    trained = {v.path.split("/")[-1] for v in model.trainable_variables}
    if lora:
        assert "LoRA rank 2" in out
        assert {"lora_kernel_a", "lora_kernel_b"} <= trained
        assert "embeddings" not in trained
        layouts = {
            tuple(v.shape): model.optimizer.channel_layout(v).channel_axes
            for v in model.trainable_variables
            if "lora_kernel" in v.path
        }
        assert layouts == {(32, 4, 2): (2,), (2, 8): (1,)}
    else:
        assert "embeddings" in trained and "lora_kernel_a" not in trained


def test_image_classifier_fine_tunes_offline_with_a_progress_bar(capsys):
    result, out = run(
        ["--task", "image", *FEW_STEPS, "--examples", "160", "--verbose", "1"],
        capsys,
    )
    assert "ViTImageClassifier on image" in out
    assert "3/3" in out  # fit's progress bar
    model = result["model"]
    token = next(v for v in model.trainable_variables if "class_token" in v.path)
    assert model.optimizer.channel_layout(token).num_channels == 1
    assert np.isfinite(result["seconds"])


def test_mesh_needs_jax_and_a_well_formed_shape():
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--mesh", "2by4"])
    with pytest.raises(SystemExit):
        example.parse_args(["--lora", "-1"])
    assert example.parse_args(["--mesh", "2x4"]).mesh == (2, 4)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="--mesh is keras.distribution on JAX"
)
def test_text_classifier_under_model_parallel(capsys):
    # The --mesh code path on a 1x1 mesh of the one CPU device (in process:
    # the 2x4 mesh of 8 virtual devices is test_model_parallel.py's Gemma,
    # and was run by hand here).
    argv = [*FEW_STEPS, "--examples", "128", "--verbose", "0", "--mesh", "1x1"]
    try:
        result, out = run(argv, capsys)
    finally:
        keras.distribution.set_distribution(None)
    assert "mesh (1, 1): " in out and "kernels sharded over 'model'" in out
    assert int(result["model"].optimizer.iterations) == 3
