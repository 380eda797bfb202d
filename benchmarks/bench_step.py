"""Optimizer step time on the ResNet-50 variable set: the five optimizers
against Keras's own, on every backend.

Times one `optimizer.apply(grads, variables)` on the 214 trainable variables
(25.6 M parameters) of `keras.applications.ResNet50(weights=None)` (their
shapes; fixed random gradients), run as the backend runs a training step:

* TensorFlow: `tf.function(optimizer.apply)` with `jit_compile=True` ("xla")
  and without ("graph"); and both under `MirroredStrategy(["CPU:0"])`
  ("mirrored-xla", "mirrored-graph"), as Keras's trainer runs a step under a
  strategy: a `tf.function` (with or without `jit_compile`) of
  `strategy.run(step)`, variables and slots created in the strategy's scope.
* JAX: `jax.jit(optimizer.stateless_apply)` ("xla"; there is no other mode).
* torch: eager `optimizer.apply(grads, variables)` as a custom training
  loop calls it ("eager"), and under `torch.no_grad()` as Keras's torch
  trainer calls it ("eager-nograd"; then autograd records nothing).
* The official PyTorch code ("official"): `adamp.AdamP`, `adamp.SGDP`,
  `torch.optim.AdamW`, `torch.optim.SGD` on the same shapes in PyTorch's
  layout, in the same process and threads (by default with the torch
  backend; `--official` adds them to another backend's run).

Pairs, each ours / its Keras base with the same hyperparameters:
AdamP/AdamW, SGDP/SGD (momentum 0.9, Nesterov), SGDP-plain/SGD-plain
(momentum 0.9, no Nesterov), AdamS/Adam, AdamSRT/Adam, SGDMRT/SGD-plain.
The spherical optimizers designate the kernels that
`keras_adamp.normalized_kernels(model)` finds (the 53 convolution kernels
followed by BatchNorm); AdamP and SGDP test every variable as they do.

Within one mode ("group"), every configuration runs once per round, in turn
(interleaved rounds), so that load from other processes hits all of them
alike; then the group is freed and the next one built. Printed and written:
the median of the per-round step times (wall, and CPU seconds of the
process per step: "stepCPU", which other processes' load inflates less) and
the same-run ratios, the first call of each (trace and compile, wall and CPU seconds; a ratio of CPU seconds
is less sensitive to other processes), and the size of the compiled program
(TensorFlow: ops of the `tf.function` graph, counting those in the functions
of its library, i.e. cond branches and the replica function under a
strategy; JAX: equations of the jaxpr, nested ones included), which is what
compile time grows with. The JSON names the machine, the load average at the
start and end of each group, and the keras_adamp commit.

    python benchmarks/bench_step.py                     # TensorFlow, 4 modes
    python benchmarks/bench_step.py --backend jax
    python benchmarks/bench_step.py --backend torch     # + official torch code
    python benchmarks/bench_step.py --backend all --json step.json  # each in its own process
    python benchmarks/bench_step.py --optimizers AdamP,SGDP --modes xla --rounds 3
    python benchmarks/bench_step.py --model resnet18ish --rounds 1 --steps 1  # smoke
    python benchmarks/bench_step.py --compare /tmp/before   # + another checkout
    python benchmarks/bench_step.py --summary step.json     # its table again

`--optimizers` takes ours and/or Keras's names (each of ours brings its
base). `--compare DIR` also steps the selected optimizers of the keras_adamp
in checkout DIR (e.g. `git worktree add /tmp/before <commit>`) as
"AdamP@base" etc., interleaved with the rest in the same process:
before/after ratios that load on a shared machine hits alike.

TensorFlow runs each mode in its own process (and `--backend all` each
backend), merged into one JSON: a process that compiled all 40
configurations would hold ~10 GB. A default run of one backend takes
5-12 minutes on a quiet 2-core CPU (TensorFlow the longest: 40 XLA or graph
compilations), 2-3 times that under a load of 8. torch's worker threads
spin: on cores shared with other processes its steps slow down 10-30x
(measured: AdamP 22 s a step at a load of 12 on 2 cores), so there pass
`--torch-threads 1 --rounds 3 --steps 1`. Run from the repository root (or
with keras_adamp importable).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _common import loadavg
from _common import machine
from _common import ratio_table
from _common import select_backend
from _common import time_rounds
from _common import write_json

BACKENDS = ("tensorflow", "jax", "torch")
MODES = {
    "tensorflow": ("xla", "graph", "mirrored-xla", "mirrored-graph"),
    "jax": ("xla",),
    "torch": ("eager", "eager-nograd"),
}
#: ours -> its Keras base (same hyperparameters; see `keras_optimizers`).
BASES = {
    "AdamP": "AdamW",
    "SGDP": "SGD",
    "SGDP-plain": "SGD-plain",
    "AdamS": "Adam",
    "AdamSRT": "Adam",
    "SGDMRT": "SGD-plain",
}
#: ours -> the official PyTorch code's counterpart (`adamp==0.3.0`).
OFFICIAL = {
    "AdamP": "adamp.AdamP",
    "AdamW": "torch.AdamW",
    "SGDP": "adamp.SGDP",
    "SGD": "torch.SGD",
    "SGDP-plain": "adamp.SGDP-plain",
    "SGD-plain": "torch.SGD-plain",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        choices=BACKENDS + ("all",),
        help="all: each backend in its own process, one after the other",
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(BASES),
        help="comma-separated, of " + ", ".join(BASES) + " (each brings its "
        "Keras base) and of the bases themselves; default: all",
    )
    parser.add_argument(
        "--modes",
        help="comma-separated; TensorFlow: xla, graph, mirrored-xla, "
        "mirrored-graph; JAX: xla; torch: eager, eager-nograd, official. "
        "Default: all of the backend's (torch: and official)",
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
    parser.add_argument(
        "--official",
        action="store_true",
        help="also time the official torch code (default with --backend torch)",
    )
    parser.add_argument(
        "--no-official",
        "--no-torch",
        dest="no_official",
        action="store_true",
        help="skip the official torch code",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (Keras's torch backend and the official "
        "code alike; default: torch's own)",
    )
    parser.add_argument(
        "--no-xla", action="store_true", help="TensorFlow: only the graph mode"
    )
    parser.add_argument(
        "--only-xla", action="store_true", help="TensorFlow: only the xla mode"
    )
    parser.add_argument(
        "--compare",
        metavar="DIR",
        help="also time the selected optimizers of the keras_adamp in this "
        "checkout (names suffixed @base)",
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=1800,
        help="seconds allowed to each TensorFlow mode's process",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--summary", metavar="JSON", help="print the summary of a written JSON"
    )
    args = parser.parse_args(argv)
    if args.summary:
        return args
    args.optimizers = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    known = set(BASES) | set(BASES.values())
    unknown = [n for n in args.optimizers if n not in known]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {sorted(known)}")
    if args.backend == "all":
        return args
    if args.modes:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    else:
        args.modes = list(MODES[args.backend])
        if args.no_xla:
            args.modes = ["graph"]
        if args.only_xla:
            args.modes = ["xla"]
        if args.backend == "torch":
            args.modes.append("official")
    if args.official and "official" not in args.modes:
        args.modes.append("official")
    if args.no_official and "official" in args.modes:
        args.modes.remove("official")
    allowed = MODES[args.backend] + ("official",)
    bad = [m for m in args.modes if m not in allowed]
    if bad:
        parser.error(f"modes {bad} not available on {args.backend}: {allowed}")
    return args


def import_other(path):
    """The keras_adamp package of checkout `path`, imported under its own
    module objects and then dropped from sys.modules, so that the plain
    `import keras_adamp` that follows gets this one."""
    import importlib

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
#: No Keras in this process: --backend all (a driver) or --summary.
DRIVER = ARGS is not None and (ARGS.backend == "all" or bool(ARGS.summary))
if ARGS is not None and not DRIVER:
    select_backend(ARGS.backend)
    if ARGS.compare:
        OTHER = import_other(ARGS.compare)

if not DRIVER:
    # The layouts guessed from names are those of these shapes (the
    # variables carry no layer); the warning saying so is noise here.
    import warnings

    import keras
    import numpy as np

    import keras_adamp

    warnings.filterwarnings("ignore", message=".*output channels of .* guessed")

WEIGHT_DECAY_ADAM = 1e-2
WEIGHT_DECAY_SGD = 1e-4
LR_ADAM = 1e-3
LR_SGD = 0.1
MOMENTUM = 0.9


def build_model(model_name):
    if model_name == "resnet50":
        return keras.applications.ResNet50(weights=None)
    inputs = keras.Input((64, 64, 3))
    x = inputs
    for filters in (64, 64, 128, 128, 256, 256, 512, 512):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1000)(x)
    return keras.Model(inputs, x)


def variable_specs(model_name):
    """[(name, shape, designated)] of the model's trainable variables (Keras
    layout); `designated`: whether `keras_adamp.normalized_kernels(model)`
    (the spherical optimizers' set) holds it."""
    import re

    model = build_model(model_name)
    regex = keras_adamp.normalized_kernels(model)
    pattern = re.compile(regex) if regex else None
    specs = [
        (
            v.path.replace("/", "__"),  # a Variable's name can't hold "/"
            tuple(v.shape),
            bool(pattern and pattern.search(v.path)),
        )
        for v in model.trainable_variables
    ]
    del model
    keras.backend.clear_session()
    return specs


def _factories(module, designated):
    """name -> factory of a fresh optimizer of keras_adamp `module` (ours);
    `designated()` gives the spherical optimizers' variables."""
    return {
        "AdamP": lambda: module.AdamP(
            learning_rate=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM
        ),
        "SGDP": lambda: module.SGDP(
            learning_rate=LR_SGD,
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
        "SGDP-plain": lambda: module.SGDP(
            learning_rate=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY_SGD
        ),
        "AdamS": lambda: module.AdamS(learning_rate=LR_ADAM, spherical=designated()),
        "AdamSRT": lambda: module.AdamSRT(
            learning_rate=LR_ADAM, spherical=designated()
        ),
        "SGDMRT": lambda: module.SGDMRT(
            learning_rate=LR_SGD,
            momentum=MOMENTUM,
            l2=WEIGHT_DECAY_SGD,
            spherical=designated(),
        ),
    }


def keras_factories():
    return {
        "AdamW": lambda: keras.optimizers.AdamW(
            learning_rate=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM, epsilon=1e-8
        ),
        "SGD": lambda: keras.optimizers.SGD(
            learning_rate=LR_SGD,
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
        "SGD-plain": lambda: keras.optimizers.SGD(
            learning_rate=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY_SGD
        ),
        "Adam": lambda: keras.optimizers.Adam(learning_rate=LR_ADAM, epsilon=1e-8),
    }


def selected(names):
    """The configurations to time, in order: each of ours, its Keras base,
    and (with --compare) the other checkout's."""
    out = []
    for name in names:
        for n in (name, BASES.get(name)):
            if n and n not in out:
                out.append(n)
    ours = [n for n in out if n in BASES]
    if OTHER is not None:
        out += [n + "@base" for n in ours]
    return out


def pairs(names):
    """(ours, base) name pairs of the ratios to report."""
    result = []
    for n in names:
        if n in BASES:
            result.append((n, BASES[n]))
            if n + "@base" in names:
                result.append((n, n + "@base"))
                result.append((n + "@base", BASES[n]))
    return result


def factory(name, designated):
    if name.endswith("@base"):
        return _factories(OTHER, designated)[name[: -len("@base")]]
    if name in BASES:
        return _factories(keras_adamp, designated)[name]
    return keras_factories()[name]


def make_data(specs, seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.05, s).astype("float32") for _, s, _ in specs]
    grads = [rng.normal(0, 1e-3, s).astype("float32") for _, s, _ in specs]
    return weights, grads


def slot_report(optimizer, variables):
    """Optimizer variables of a model variable's shape, per model variable."""
    shapes = {tuple(v.shape) for v in variables}
    big = [v for v in optimizer.variables if tuple(v.shape) in shapes and len(v.shape)]
    slot_elems = sum(int(np.prod(v.shape)) for v in big)
    var_elems = sum(int(np.prod(v.shape)) for v in variables)
    return {
        "slot_variables": len(big),
        "slots_per_variable": len(big) / len(variables),
        "slot_elements_per_param": slot_elems / var_elems,
    }


def built_optimizers(names, specs, weights, scope=None):
    """Yields (name, optimizer, variables, slot report): each optimizer
    built on its own copy of the variables (in `scope`, if given)."""
    import contextlib

    for name in names:
        with scope() if scope else contextlib.nullcontext():
            variables = [
                keras.Variable(w, name=n) for (n, _, _), w in zip(specs, weights)
            ]

            def designated(variables=variables):
                return [v for v, (_, _, d) in zip(variables, specs) if d]

            optimizer = factory(name, designated)()
            optimizer.build(variables)
        yield name, optimizer, variables, slot_report(optimizer, variables)


def _graph_size(graph):
    """Ops of a TF graph plus those of the functions in its library."""
    graph_def = graph.as_graph_def()
    return len(graph_def.node) + sum(
        len(f.node_def) for f in graph_def.library.function
    )


def _apply_fn(optimizer, variables):
    # A closure, not default arguments: tf.function would trace those.
    def apply(grads):
        optimizer.apply(grads, variables)
        return optimizer.iterations

    return apply


def _replicated(strategy, optimizer, variables):
    import tensorflow as tf

    def replica_step(grads):
        # Gradients made in the replica, as a tape's are (placed on its
        # device: the all-reduce needs to know where they live).
        grads = [tf.identity(g) for g in grads]
        optimizer.apply(grads, variables)
        return optimizer.iterations.value

    def step(grads):
        return strategy.run(replica_step, args=(grads,))

    return step


def tf_group(names, specs, weights, grads, mode):
    """({name: run one step}, {name: () -> graph size}, slots)."""
    import tensorflow as tf

    jit = mode.endswith("xla")
    strategy = None
    if mode.startswith("mirrored"):
        strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    steppers, sizes, slots = {}, {}, {}
    # On the accelerator, if there is one (as a step's gradients are).
    device = "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"
    with tf.device(device):
        tf_grads = [tf.identity(tf.constant(g)) for g in grads]
    scope = strategy.scope if strategy else None
    for name, optimizer, variables, slots[name] in built_optimizers(
        names, specs, weights, scope
    ):
        apply = _apply_fn(optimizer, variables)
        if strategy is not None:
            # As Keras's trainer: the (XLA-compiled) tf.function runs
            # strategy.run of the step.
            apply = _replicated(strategy, optimizer, variables)
        step = tf.function(apply, jit_compile=jit)

        def run(fn=step):
            fn(tf_grads).numpy()  # blocks until done

        def size(fn=step):
            return _graph_size(fn.get_concrete_function(tf_grads).graph)

        steppers[name] = run
        sizes[name] = size
    return steppers, sizes, slots


def _jaxpr_eqns(jaxpr):
    """Equations of a jaxpr, those of nested jaxprs (cond, pjit...) too."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    count += _jaxpr_eqns(sub)
    return count


def jax_group(names, specs, weights, grads, mode):
    """As `tf_group`; the size is the number of equations of the jaxpr."""
    import jax

    steppers, sizes, slots = {}, {}, {}
    jax_grads = [jax.numpy.asarray(g) for g in grads]
    for name, optimizer, variables, slots[name] in built_optimizers(
        names, specs, weights
    ):
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
            return _jaxpr_eqns(jaxpr.jaxpr)

        steppers[name] = run
        sizes[name] = size
    return steppers, sizes, slots


def torch_group(names, specs, weights, grads, mode):
    """Keras's torch backend, eager: "eager" calls `optimizer.apply(grads,
    variables)` as a custom training loop does; "eager-nograd" calls it
    under `torch.no_grad()`, as Keras's torch trainer does (then no op of
    the step is recorded for autograd). No program size."""
    import contextlib

    import torch

    steppers, slots = {}, {}
    torch_grads = [keras.ops.convert_to_tensor(g) for g in grads]
    context = torch.no_grad if mode == "eager-nograd" else contextlib.nullcontext
    for name, optimizer, variables, slots[name] in built_optimizers(
        names, specs, weights
    ):

        def run(optimizer=optimizer, variables=variables):
            with context():
                optimizer.apply(torch_grads, variables)
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        steppers[name] = run
    return steppers, {}, slots


def torch_layout(shape):
    """Keras kernel shape -> PyTorch's (out, in, *k)."""
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) >= 3:
        return (shape[-1], shape[-2]) + tuple(shape[:-2])
    return shape


def official_group(names, specs, weights, grads, mode):
    """The official PyTorch code on PyTorch-layout shapes (`adamp==0.3.0`
    and torch.optim), for the selected names that have a counterpart."""
    try:
        import adamp
        import torch
    except ImportError as error:
        print(f"official torch code skipped: {error}")
        return {}, {}, {}
    factories = {
        "adamp.AdamP": lambda p: adamp.AdamP(
            p, lr=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM
        ),
        "torch.AdamW": lambda p: torch.optim.AdamW(
            p, lr=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM, eps=1e-8
        ),
        "adamp.SGDP": lambda p: adamp.SGDP(
            p,
            lr=LR_SGD,
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
        "torch.SGD": lambda p: torch.optim.SGD(
            p,
            lr=LR_SGD,
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
        "adamp.SGDP-plain": lambda p: adamp.SGDP(
            p, lr=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY_SGD
        ),
        "torch.SGD-plain": lambda p: torch.optim.SGD(
            p, lr=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY_SGD
        ),
    }

    # Keras's torch backend puts its variables on the GPU if there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def to_torch(x):
        return torch.from_numpy(x.copy()).reshape(torch_layout(x.shape)).to(device)

    steppers = {}
    for name in names:
        official = OFFICIAL.get(name)
        if official is None or official in steppers:
            continue
        params = [torch.nn.Parameter(to_torch(w)) for w in weights]
        for p, g in zip(params, grads):
            p.grad = to_torch(g)
        optimizer = factories[official](params)

        def run(optimizer=optimizer):
            with torch.no_grad():
                optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()

        steppers[official] = run
    return steppers, {}, {}


OFFICIAL_PAIRS = (
    ("adamp.AdamP", "torch.AdamW"),
    ("adamp.SGDP", "torch.SGD"),
    ("adamp.SGDP-plain", "torch.SGD-plain"),
)
GROUPS = {
    "tensorflow": tf_group,
    "jax": jax_group,
    "torch": torch_group,
}


def run_group(args, mode, names, specs, weights, grads):
    """Times one mode's configurations in interleaved rounds; returns its
    results (JSON-ready)."""
    builder = official_group if mode == "official" else GROUPS[args.backend]
    print(f"\n== {args.backend} {mode}: building", flush=True)
    load_start = loadavg()
    steppers, sizes, slots = builder(names, specs, weights, grads, mode)
    group = {"mode": mode, "loadavg_start": load_start}
    if not steppers:
        group["skipped"] = "nothing to run"
        return group, {}
    times, first = time_rounds(steppers, args.rounds, args.steps, args.warmup)
    sizes = {n: size() for n, size in sizes.items()}
    medians = {n: 1e3 * statistics.median(t) for n, t in times.items() if t}
    group_pairs = pairs(names) if mode != "official" else OFFICIAL_PAIRS
    group.update(
        {
            "median_ms": medians,
            "times_ms": {n: [1e3 * x for x in t] for n, t in times.items()},
            "ratios": ratio_table(medians, group_pairs, f"{mode}: step ratios"),
            "first_call_s": first,
            "first_call_ratios": ratio_table(
                first, group_pairs, f"{mode}: first-call ratios (wall, CPU)"
            ),
            "program_size": sizes,
            "program_size_ratios": ratio_table(
                sizes, group_pairs, f"{mode}: program-size ratios"
            )
            if sizes
            else {},
            "slots": slots,
            "loadavg_end": loadavg(),
        }
    )
    print(f"{mode}: median step (ms), first call (s), program size:")
    for n in steppers:
        print(
            f"  {n:<18} {medians.get(n, float('nan')):9.2f} "
            f"{first[n]:7.2f} {sizes.get(n, ''):>8}"
        )
    steppers = sizes = None
    return group, {n: medians.get(n) for n in medians}


def main(args):
    specs = variable_specs(args.model)
    weights, grads = make_data(specs)
    numel = sum(int(np.prod(s)) for _, s, _ in specs)
    names = selected(args.optimizers)
    print(
        f"{args.model}: {len(specs)} variables, {numel / 1e6:.2f} M parameters "
        f"({sum(d for *_, d in specs)} designated spherical); backend "
        f"{keras.backend.backend()}; modes {args.modes}; {names}"
    )
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    result = {
        "machine": machine(),
        "model": args.model,
        "backend": args.backend,
        "compare": getattr(OTHER, "__file__", None),
        "variables": len(specs),
        "parameters": numel,
        "designated": sum(d for *_, d in specs),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "groups": {},
    }
    if args.backend == "torch" or "official" in args.modes:
        try:
            import torch

            result["torch_threads"] = torch.get_num_threads()
            result["torch"] = torch.__version__
        except ImportError:
            pass
    all_medians = {}
    for mode in args.modes:
        group, medians = run_group(args, mode, names, specs, weights, grads)
        result["groups"][mode] = group
        all_medians.update({f"{n} [{mode}]": t for n, t in medians.items()})
        keras.backend.clear_session()
        gc.collect()
    # Ours (Keras, eager) against the official torch code: same process,
    # same threads, but not interleaved (two groups).
    cross = {}
    if "official" in args.modes:
        for mode in args.modes:
            for ours, official in OFFICIAL.items():
                a = all_medians.get(f"{ours} [{mode}]")
                b = all_medians.get(f"{official} [official]")
                if a and b and mode != "official":
                    cross[f"{ours} [{mode}]/{official}"] = a / b
    result["vs_official"] = cross
    result["machine"]["loadavg_end"] = loadavg()
    print()
    print(summary(result))
    write_json(args.json, result)
    return result


def summary(result):
    """Text table of one backend's result: per mode, ours/base ratios of
    step time, first call (wall and CPU) and program size."""
    m = result["machine"]
    header = (
        f"backend {result['backend']}, {result['model']} "
        f"({result['variables']} variables), keras_adamp "
        f"{m.get('package_commit', '?')} (HEAD {m.get('commit', '?')}"
        f"{', dirty' if m.get('package_dirty') else ''}), {m.get('cpu', '?')}, "
        f"{m.get('cpus')} CPUs, load {_load(m.get('loadavg_start'))} -> "
        f"{_load(m.get('loadavg_end'))}"
    )
    columns = (
        f"{'mode':<15} {'pair':<32} {'ours ms':>9} {'base ms':>9} {'step':>6} "
        f"{'stepCPU':>7} {'first':>6} {'1st CPU':>7} {'size':>6}"
    )
    lines = [header, columns]
    for mode, group in result["groups"].items():
        med = group.get("median_ms", {})
        first = group.get("first_call_s", {})
        size = group.get("program_size", {})
        group_pairs = OFFICIAL_PAIRS if mode == "official" else pairs(list(med.keys()))
        for a, b in group_pairs:
            if a not in med or b not in med:
                continue

            def ratio(d, x, y):
                return f"{d[x] / d[y]:.2f}" if d.get(x) and d.get(y) else "-"

            lines.append(
                f"{mode:<15} {a + '/' + b:<32} {med[a]:9.1f} {med[b]:9.1f} "
                f"{med[a] / med[b]:6.2f} {ratio(med, a + ' cpu', b + ' cpu'):>7} "
                f"{ratio(first, a, b):>6} "
                f"{ratio(first, a + ' cpu', b + ' cpu'):>7} "
                f"{ratio(size, a, b):>6}"
            )
    for name, r in result.get("vs_official", {}).items():
        lines.append(f"{'vs official':<15} {name:<40} {r:6.2f}")
    return "\n".join(lines)


def _load(value):
    return "/".join(f"{x:.1f}" for x in value) if value else "?"


def _without(argv, options):
    """`argv` less the given options and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


def _child(cmd, timeout):
    """Runs this script in a child process; its JSON result, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), *cmd, "--json", out]
        print(f"\n#### {' '.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, check=False, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        return {"error": f"exit {rc}"}


def run_modes_apart(args, argv):
    """TensorFlow with several modes: each mode in its own process (a
    process that compiled 10 optimizers x 4 modes on ResNet-50 holds ~10 GB),
    merged into one result."""
    passed = _without(argv, ("--backend", "--json", "--modes", "--timeout"))
    passed = [a for a in passed if a not in ("--no-xla", "--only-xla")]
    result = None
    for mode in args.modes:
        part = _child(
            ["--backend", args.backend, "--modes", mode, *passed], args.timeout
        )
        if "groups" not in part:
            part = {"groups": {mode: {"mode": mode, "error": part.get("error")}}}
        if result is None or "machine" not in result:
            groups = (result or {}).get("groups", {})
            result = dict(part, groups={**groups, **part["groups"]})
        else:
            result["groups"].update(part["groups"])
    result["modes_in_own_processes"] = True
    if "machine" in result:
        result["machine"]["loadavg_end"] = loadavg()
        print()
        print(summary(result))
    write_json(args.json, result)
    return result


def run_all(args, argv):
    """--backend all: each backend in its own process (its own timeout);
    one JSON {backend: result} and the summaries of all three."""
    passed = _without(argv, ("--backend", "--json"))
    results = {}
    for backend in BACKENDS:
        results[backend] = _child(["--backend", backend, *passed], None)
    print("\n#### summary")
    for backend, result in results.items():
        print(summary(result) if "groups" in result else f"{backend}: {result}")
        print()
    write_json(args.json, results)
    return results


def print_summary(path):
    """Prints the summary of a JSON written by this script (one backend's,
    or --backend all's)."""
    with open(path) as f:
        result = json.load(f)
    for r in [result] if "groups" in result else result.values():
        print(summary(r) if "groups" in r else r)
        print()


if __name__ == "__main__":
    if ARGS.summary:
        print_summary(ARGS.summary)
    elif ARGS.backend == "all":
        run_all(ARGS, sys.argv[1:])
    elif ARGS.backend == "tensorflow" and len(ARGS.modes) > 1:
        run_modes_apart(ARGS, sys.argv[1:])
    else:
        main(ARGS)
