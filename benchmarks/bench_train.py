"""Whole training step (forward + backward + update) of a BatchNorm ResNet:
AdamP vs AdamW and SGDP vs SGD, as ratios.

ResNet-20 (CIFAR-style, 0.27 M parameters) at batch 128 on 32x32x3 inputs by
default; `--model resnet50` is keras.applications' ResNet50 (224x224x3,
25.6 M parameters, logits out), at `--batch 2` or `16` on a CPU, 256 on a GPU.
Each optimizer trains its own copy of the same model (same initial weights)
with `model.train_on_batch` on one fixed random batch, compiled with
`jit_compile` on or off; the first call of each (trace, compile and one step:
what a user waits for before training starts) is timed alone, then the
configurations are timed in interleaved rounds and the medians and ratios
are printed.

    python benchmarks/bench_train.py                       # ResNet-20, batch 128
    python benchmarks/bench_train.py --no-xla --json out.json
    KERAS_BACKEND=jax python benchmarks/bench_train.py
    python benchmarks/bench_train.py --model resnet50 --batch 2      # CPU
    python benchmarks/bench_train.py --model resnet50 --batch 256    # on a GPU

Run from the repository root (or with keras_adamp importable).
"""

import argparse
import os
import statistics

from _common import machine
from _common import ratio_table
from _common import select_backend
from _common import time_rounds
from _common import write_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        choices=["tensorflow", "jax", "torch"],
    )
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "resnet50"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--no-xla", action="store_true", help="compile with jit_compile=False"
    )
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    select_backend(ARGS.backend)

import _optimizers
import keras
import numpy as np


def resnet20(num_classes=10):
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64."""
    layers = keras.layers

    def conv_bn(x, filters, strides=1, relu=True):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(
            x
        )
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input((32, 32, 3))
    x = conv_bn(inputs, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = conv_bn(x, filters, strides)
            y = conv_bn(y, filters, relu=False)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(
                    shortcut
                )
                shortcut = layers.BatchNormalization()(shortcut)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="resnet20")


def build_model(name):
    if name == "resnet20":
        return resnet20(), (32, 32, 3), 10
    # Logits out (the loss takes from_logits=True): no softmax to undo.
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    return model, (224, 224, 3), 1000


#: Ours and the Keras optimizers they are compared with, with the
#: hyperparameters of bench_step.py (`_optimizers.py`).
OPTIMIZERS = ("AdamP", "AdamW", "SGDP", "SGD")
PAIRS = (("AdamP", "AdamW"), ("SGDP", "SGD"))


def main(args):
    where = machine()  # load average at the start
    keras.utils.set_random_seed(0)
    reference, input_shape, classes = build_model(args.model)
    initial = reference.get_weights()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch,) + input_shape).astype("float32")
    y = rng.integers(0, classes, size=(args.batch,))
    jit = not args.no_xla
    if args.backend == "torch":
        jit = False
    print(
        f"{args.model}: {reference.count_params() / 1e6:.2f} M parameters, "
        f"batch {args.batch}, backend {keras.backend.backend()}, "
        f"jit_compile={jit}"
    )
    steppers = {}
    slots = {}
    for name in OPTIMIZERS:
        model, _, _ = build_model(args.model)
        model.set_weights(initial)
        optimizer = _optimizers.factory(name, designated=None)()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
        optimizer.build(model.trainable_variables)
        n_slots = sum(1 for v in optimizer.variables if len(v.shape) > 0)
        slots[name] = n_slots / len(model.trainable_variables)
        steppers[name] = lambda model=model: model.train_on_batch(x, y)
    times, first = time_rounds(steppers, args.rounds, args.steps, args.warmup)
    print("\nfirst train_on_batch (trace + compile + one step), s:")
    for n, t in first.items():
        print(f"  {n:<6} {t:9.2f}")
    first_ratios = ratio_table(first, PAIRS, "first-call ratios")
    medians = {n: statistics.median(t) for n, t in times.items()}
    print("median training step (ms):")
    for n, t in medians.items():
        print(f"  {n:<6} {1e3 * t:9.1f}")
    ratios = ratio_table(medians, PAIRS, "ratios")
    print(
        "slots per trainable variable: "
        + ", ".join(f"{n} {s:.0f}" for n, s in slots.items())
    )
    result = {
        "model": args.model,
        "batch": args.batch,
        "backend": keras.backend.backend(),
        "jit_compile": jit,
        "rounds": args.rounds,
        "steps": args.steps,
        "median_ms": {n: 1e3 * t for n, t in medians.items()},
        "times_ms": {n: [1e3 * x for x in t] for n, t in times.items()},
        "ratios": ratios,
        "first_call_s": first,
        "first_call_ratios": first_ratios,
        "slots_per_variable": slots,
        "machine": dict(where, loadavg_end=os.getloadavg()),
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(ARGS)
