"""Optimizer step time on the ResNet-50 variable set: AdamP vs AdamW, SGDP vs SGD.

Times one `optimizer.apply(grads, variables)` on the 214 trainable variables (25.6 M parameters)
of `keras.applications.ResNet50(weights=None)` (their shapes and names; fixed
random gradients), compiled as the backend compiles a training step:

* TensorFlow: `tf.function(optimizer.apply)` with and without `jit_compile=True`.
* JAX: `jax.jit(optimizer.stateless_apply)` (XLA; there is no non-XLA mode).

Configurations are timed in interleaved rounds (every configuration once per
round, in turn), so that load from other processes hits all of them alike; the
medians of the per-round step times and their ratios are printed, with the
first call of each (trace and compile) and the size of the compiled program
(TensorFlow: ops in the `tf.function` graph; JAX: equations of the jaxpr),
which is what compile time grows with. With torch and
the official `adamp` installed, torch's `adamp.AdamP`/`adamp.SGDP` and
`torch.optim.AdamW`/`SGD` step the same shapes (PyTorch layout) in the same run.

    python benchmarks/bench_step.py                     # TensorFlow
    python benchmarks/bench_step.py --backend jax
    python benchmarks/bench_step.py --rounds 7 --json out.json
    python benchmarks/bench_step.py --compare /tmp/before   # + another checkout

`--compare DIR` also steps AdamP and SGDP of the keras_adamp in checkout DIR
(e.g. `git worktree add /tmp/before <commit>`) as "AdamP@base"/"SGDP@base",
interleaved with the rest in the same process: before/after ratios that load
on a shared machine hits alike.

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
        choices=["tensorflow", "jax"],
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--steps", type=int, default=3, help="steps per configuration per round"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps")
    parser.add_argument(
        "--model",
        default="resnet50",
        choices=["resnet50", "resnet18ish"],
        help="variable set (resnet18ish: a small set for a quick smoke run)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip torch")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the torch reference (default: torch's "
        "own; 1 is steadier on cores shared with other processes, where "
        "torch's spinning worker threads degrade badly)",
    )
    parser.add_argument(
        "--no-xla",
        action="store_true",
        help="TensorFlow: time only without jit_compile",
    )
    parser.add_argument(
        "--only-xla",
        action="store_true",
        help="TensorFlow: time only with jit_compile",
    )
    parser.add_argument(
        "--compare",
        metavar="DIR",
        help="also time AdamP/SGDP of the keras_adamp in this checkout",
    )
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args(argv)


def import_other(path):
    """The keras_adamp package of checkout `path`, imported under its own
    module objects and then dropped from sys.modules, so that the plain
    `import keras_adamp` that follows gets this one."""
    import importlib
    import sys

    sys.path.insert(0, path)
    try:
        module = importlib.import_module("keras_adamp")
    finally:
        sys.path.remove(path)
    for name in [n for n in sys.modules if n.split(".")[0] == "keras_adamp"]:
        del sys.modules[name]
    return module


ARGS = parse_args() if __name__ == "__main__" else None
OTHER = None
if ARGS is not None:
    select_backend(ARGS.backend)
    if ARGS.compare:
        OTHER = import_other(ARGS.compare)

import keras
import numpy as np

import keras_adamp

WEIGHT_DECAY_ADAM = 1e-2
WEIGHT_DECAY_SGD = 1e-4
LR_ADAM = 1e-3
LR_SGD = 0.1


def variable_specs(model_name):
    """[(name, shape)] of the model's trainable variables (Keras layout)."""
    if model_name == "resnet50":
        model = keras.applications.ResNet50(weights=None)
    else:
        inputs = keras.Input((64, 64, 3))
        x = inputs
        for filters in (64, 64, 128, 128, 256, 256, 512, 512):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dense(1000)(x)
        model = keras.Model(inputs, x)
    specs = [(v.name, tuple(v.shape)) for v in model.trainable_variables]
    del model
    keras.backend.clear_session()
    return specs


def keras_optimizers():
    """name -> factory of a fresh optimizer."""
    ours = {
        "AdamP": lambda: keras_adamp.AdamP(
            learning_rate=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM
        ),
        "AdamW": lambda: keras.optimizers.AdamW(
            learning_rate=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM, epsilon=1e-8
        ),
        "SGDP": lambda: keras_adamp.SGDP(
            learning_rate=LR_SGD,
            momentum=0.9,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
        "SGD": lambda: keras.optimizers.SGD(
            learning_rate=LR_SGD,
            momentum=0.9,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
    }
    if OTHER is not None:
        ours["AdamP@base"] = lambda: OTHER.AdamP(
            learning_rate=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM
        )
        ours["SGDP@base"] = lambda: OTHER.SGDP(
            learning_rate=LR_SGD,
            momentum=0.9,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        )
    return ours


PAIRS = (
    ("AdamP", "AdamW"),
    ("SGDP", "SGD"),
    ("AdamP", "AdamP@base"),
    ("SGDP", "SGDP@base"),
    ("AdamP@base", "AdamW"),
    ("SGDP@base", "SGD"),
)


def make_data(specs, seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.05, s).astype("float32") for _, s in specs]
    grads = [rng.normal(0, 1e-3, s).astype("float32") for _, s in specs]
    return weights, grads


def slot_report(optimizer, variables):
    """Optimizer variables of a model variable's shape, per model variable."""
    shapes = [tuple(v.shape) for v in variables]
    big = [
        v
        for v in optimizer.variables
        if tuple(v.shape) in set(shapes) and len(v.shape) > 0
    ]
    slot_elems = sum(int(np.prod(v.shape)) for v in big)
    var_elems = sum(int(np.prod(s)) for s in shapes)
    return {
        "slot_variables": len(big),
        "slots_per_variable": len(big) / len(variables),
        "slot_elements_per_param": slot_elems / var_elems,
    }


def _apply_fn(optimizer, variables):
    def step(grads):
        optimizer.apply(grads, variables)
        return optimizer.iterations

    return step


def built_optimizers(specs, weights):
    """Yields (name, optimizer, variables, slot report): each optimizer of
    `keras_optimizers()` built on its own copy of the variables."""
    for name, factory in keras_optimizers().items():
        variables = [keras.Variable(w, name=n) for (n, _), w in zip(specs, weights)]
        optimizer = factory()
        optimizer.build(variables)
        yield name, optimizer, variables, slot_report(optimizer, variables)


def tf_steppers(specs, weights, grads, jit):
    """({name: run one step}, {name: graph op count, after the first run},
    slots)."""
    import tensorflow as tf

    steppers = {}
    sizes = {}
    slots = {}
    tf_grads = [tf.constant(g) for g in grads]
    for name, optimizer, variables, slots[name] in built_optimizers(specs, weights):
        fn = tf.function(_apply_fn(optimizer, variables), jit_compile=jit)

        def run(fn=fn):
            fn(tf_grads).numpy()  # blocks until done

        def size(fn=fn):
            graph = fn.get_concrete_function(tf_grads).graph  # no new trace
            return len(graph.get_operations())

        steppers[name] = run
        sizes[name] = size
    return steppers, sizes, slots


def jax_steppers(specs, weights, grads):
    """As `tf_steppers`; the size is the number of equations of the jaxpr."""
    import jax

    steppers = {}
    sizes = {}
    slots = {}
    jax_grads = [jax.numpy.asarray(g) for g in grads]
    for name, optimizer, variables, slots[name] in built_optimizers(specs, weights):
        state = {
            "train": [v.value for v in variables],
            "opt": [v.value for v in optimizer.variables],
        }
        fn = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))

        def run(fn=fn, state=state):
            train, opt = fn(state["opt"], jax_grads, state["train"])
            state["train"], state["opt"] = train, opt
            jax.block_until_ready(train)

        def size(optimizer=optimizer, state=state):
            jaxpr = jax.make_jaxpr(optimizer.stateless_apply)(
                state["opt"], jax_grads, state["train"]
            )
            return len(jaxpr.jaxpr.eqns)

        steppers[name] = run
        sizes[name] = size
    return steppers, sizes, slots


def torch_layout(shape):
    """Keras kernel shape -> PyTorch's (out, in, *k)."""
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) >= 3:
        return (shape[-1], shape[-2]) + tuple(shape[:-2])
    return shape


def torch_steppers(specs, weights, grads, threads=None):
    try:
        import adamp
        import torch
    except ImportError as error:
        print(f"torch reference skipped: {error}")
        return {}, None
    if threads:
        torch.set_num_threads(threads)
    steppers = {}
    factories = {
        "torch AdamP": lambda p: adamp.AdamP(
            p, lr=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM
        ),
        "torch AdamW": lambda p: torch.optim.AdamW(
            p, lr=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM, eps=1e-8
        ),
        "torch SGDP": lambda p: adamp.SGDP(
            p,
            lr=LR_SGD,
            momentum=0.9,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
        "torch SGD": lambda p: torch.optim.SGD(
            p,
            lr=LR_SGD,
            momentum=0.9,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
    }

    def to_torch(x):
        return torch.from_numpy(
            np.ascontiguousarray(x.reshape(x.shape)).copy()
        ).reshape(torch_layout(x.shape))

    for name, factory in factories.items():
        params = [torch.nn.Parameter(to_torch(w)) for w in weights]
        for p, g in zip(params, grads):
            p.grad = to_torch(g)
        optimizer = factory(params)

        @torch.no_grad()
        def run(optimizer=optimizer):
            optimizer.step()

        steppers[name] = run
    info = {
        "torch": torch.__version__,
        "adamp": getattr(adamp, "__version__", "?"),
        "threads": torch.get_num_threads(),
    }
    return steppers, info


def main(args):
    specs = variable_specs(args.model)
    weights, grads = make_data(specs)
    numel = sum(int(np.prod(s)) for _, s in specs)
    print(
        f"{args.model}: {len(specs)} variables, {numel / 1e6:.2f} M parameters; "
        f"backend {keras.backend.backend()}"
    )
    result = {
        "machine": machine(),
        "model": args.model,
        "compare": getattr(OTHER, "__file__", None),
        "variables": len(specs),
        "parameters": numel,
        "rounds": args.rounds,
        "steps": args.steps,
    }
    steppers = {}
    sizes = {}
    slots = None
    if args.backend == "tensorflow":
        modes = [("xla", True), ("no-xla", False)]
        if args.no_xla:
            modes = [("no-xla", False)]
        if args.only_xla:
            modes = [("xla", True)]
        for mode, jit in modes:
            s, z, slots = tf_steppers(specs, weights, grads, jit)
            steppers.update({f"{n} [{mode}]": f for n, f in s.items()})
            if mode == modes[0][0]:  # the same graph in both modes
                sizes.update(z)
    else:
        s, sizes, slots = jax_steppers(specs, weights, grads)
        steppers.update({f"{n} [xla]": f for n, f in s.items()})
    if not args.no_torch:
        s, info = torch_steppers(specs, weights, grads, args.torch_threads)
        steppers.update(s)
        result["torch"] = info
    result["slots"] = slots

    times, first = time_rounds(steppers, args.rounds, args.steps, args.warmup)
    sizes = {n: size() for n, size in sizes.items()}
    result["graph_ops" if args.backend == "tensorflow" else "jaxpr_eqns"] = sizes
    result["first_call_s"] = first
    print("\nprogram size (TensorFlow graph ops / jaxpr equations):")
    for n, z in sizes.items():
        print(f"  {n:<22} {z:9d}")
    result["size_ratios"] = ratio_table(sizes, PAIRS, "size ratios")
    print("first call (trace + compile), s:")
    for n, t in first.items():
        print(f"  {n:<22} {t:9.2f}")
    result["first_call_ratios"] = ratio_table(first, PAIRS, "first-call ratios")
    if not args.rounds:
        write_json(args.json, result)
        return result
    medians = {n: statistics.median(t) for n, t in times.items()}
    result["median_ms"] = {n: 1e3 * t for n, t in medians.items()}
    result["times_ms"] = {n: [1e3 * x for x in t] for n, t in times.items()}

    ratios = {}
    modes = sorted({n.split(" [")[1][:-1] for n in medians if " [" in n})
    for mode in modes:
        for ours, base in PAIRS:
            a, b = f"{ours} [{mode}]", f"{base} [{mode}]"
            if a not in medians or b not in medians:
                continue
            ratios[f"{ours}/{base} [{mode}]"] = medians[a] / medians[b]
            if f"torch {ours}" in medians:
                ratios[f"{ours} [{mode}]/torch {ours}"] = (
                    medians[a] / medians[f"torch {ours}"]
                )
    for ours, base in PAIRS[:2]:
        if f"torch {ours}" in medians:
            ratios[f"torch {ours}/torch {base}"] = (
                medians[f"torch {ours}"] / medians[f"torch {base}"]
            )
    result["ratios"] = ratios
    try:
        result["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass

    print("\nmedian step time (ms):")
    for n, t in medians.items():
        print(f"  {n:<22} {1e3 * t:9.2f}")
    print("ratios:")
    for n, r in ratios.items():
        print(f"  {n:<34} {r:6.2f}")
    print("slots (optimizer variables of a model variable's shape):")
    for n, s in (slots or {}).items():
        print(f"  {n:<6} {s['slots_per_variable']:.0f} per variable")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(ARGS)
