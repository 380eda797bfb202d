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

Pairs, each ours / its Keras base with the same hyperparameters
(`_optimizers.py`): AdamP/AdamW, SGDP/SGD (momentum 0.9, Nesterov),
SGDP-plain/SGD-plain (momentum 0.9, no Nesterov), AdamS/Adam, AdamSRT/Adam,
SGDMRT/SGD-plain. `--optimizers Projected` adds `keras_adamp.Projected`
around AdamW, SGD (momentum 0.9, Nesterov) and Lion, each against its inner
optimizer, and Projected(AdamW) against AdamP (skipped, with a message,
where keras_adamp has no `Projected`).
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
    python benchmarks/bench_step.py --optimizers Projected  # the wrapped ones

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
import contextlib
import gc
import json
import os
import statistics
import sys

import _optimizers as opt
from _common import format_load
from _common import import_other
from _common import loadavg
from _common import machine
from _common import ratio_table
from _common import run_json
from _common import select_backend
from _common import time_rounds
from _common import without
from _common import write_json

BACKENDS = ("tensorflow", "jax", "torch")
MODES = {
    "tensorflow": ("xla", "graph", "mirrored-xla", "mirrored-graph"),
    "jax": ("xla",),
    "torch": ("eager", "eager-nograd"),
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
        default=",".join(opt.BASES),
        help=f"comma-separated, of {', '.join(opt.BASES)} (each brings its "
        f"Keras base), the bases themselves ({', '.join(opt.KERAS)}) and "
        f"{', '.join(opt.WRAPPED)} ('Projected': all three); default: ours",
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
    parser.add_argument(
        "--all-pass",
        action="store_true",
        help="make every kernel pass the projection's cosine test (AdamP, "
        "SGDP and the wrapped optimizers get delta=1e9): the price in a "
        "network whose kernels all feed a normalization; the random "
        "gradients pass on few kernels",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--summary", metavar="JSON", help="print the summary of a written JSON"
    )
    args = parser.parse_args(argv)
    if args.summary:
        return args
    unknown = opt.unknown(opt.parse(args.optimizers))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {', '.join(opt.KNOWN)}")
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


ARGS = parse_args() if __name__ == "__main__" else None
OTHER = None
#: No Keras in this process: --backend all (a driver) or --summary.
DRIVER = ARGS is not None and (ARGS.backend == "all" or bool(ARGS.summary))
if ARGS is not None and not DRIVER:
    select_backend(ARGS.backend)
    if ARGS.compare:
        OTHER = import_other(ARGS.compare)
if not DRIVER:
    import warnings

    import _variables
    import keras
    import numpy as np
    from _steps import backend_tensors
    from _steps import keras_step
    from _steps import official_step

    # The layouts guessed from names are those of these shapes (the
    # variables carry no layer); the warning saying so is noise here.
    warnings.filterwarnings("ignore", message=".*output channels of .* guessed")


def keras_group(names, specs, weights, grads, mode):
    """({name: run one step}, {name: () -> program size}, {name: slots}) of
    the named optimizers, each on its own copy of the variables."""
    strategy = None
    if mode.startswith("mirrored"):
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    scope = strategy.scope if strategy else None
    steppers, sizes, slots = {}, {}, {}
    grads = backend_tensors(grads)
    delta = opt.ALL_PASS if ARGS is not None and ARGS.all_pass else None
    for name in names:
        variables, designated = _variables.keras_variables(specs, weights, scope)
        with scope() if scope else contextlib.nullcontext():
            optimizer = opt.factory(name, designated, OTHER, delta)()
            optimizer.build(variables)
        slots[name] = _variables.slot_report(optimizer, variables)
        steppers[name], size = keras_step(optimizer, variables, grads, mode, strategy)
        if size is not None:
            sizes[name] = size
    return steppers, sizes, slots


def official_group(names, specs, weights, grads, mode):
    """The official PyTorch code (`adamp==0.3.0`, torch.optim) on the same
    shapes in PyTorch's layout, for the names that have a counterpart."""
    try:
        import adamp  # noqa: F401 (skip the group if it is missing)
        import torch
    except ImportError as error:
        print(f"official torch code skipped: {error}")
        return {}, {}, {}
    # Keras's torch backend puts its variables on the GPU if there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steppers = {}
    for official in dict.fromkeys(opt.OFFICIAL[n] for n in names if n in opt.OFFICIAL):
        params = _variables.torch_parameters(weights, grads, device)
        steppers[official] = official_step(opt.official(official, params))
    return steppers, {}, {}


def run_group(args, mode, names, specs, weights, grads):
    """Times one mode's configurations in interleaved rounds; returns its
    results (JSON-ready) and the median step times."""
    builder = official_group if mode == "official" else keras_group
    print(f"\n== {args.backend} {mode}: building", flush=True)
    group = {"mode": mode, "loadavg_start": loadavg()}
    steppers, sizes, slots = builder(names, specs, weights, grads, mode)
    if not steppers:
        group["skipped"] = "nothing to run"
        return group, {}
    times, first = time_rounds(steppers, args.rounds, args.steps, args.warmup)
    sizes = {n: size() for n, size in sizes.items()}
    medians = {n: 1e3 * statistics.median(t) for n, t in times.items() if t}
    pairs = opt.pairs(names) if mode != "official" else opt.OFFICIAL_PAIRS
    group.update(
        median_ms=medians,
        times_ms={n: [1e3 * x for x in t] for n, t in times.items()},
        ratios=ratio_table(medians, pairs, f"{mode}: step ratios"),
        first_call_s=first,
        first_call_ratios=ratio_table(
            first, pairs, f"{mode}: first-call ratios (wall, CPU)"
        ),
        program_size=sizes,
        program_size_ratios=ratio_table(sizes, pairs, f"{mode}: program-size ratios")
        if sizes
        else {},
        slots=slots,
        loadavg_end=loadavg(),
    )
    print(f"{mode}: median step (ms), first call (s), program size:")
    for n in steppers:
        print(f"  {n:<18} {medians[n]:9.2f} {first[n]:7.2f} {sizes.get(n, ''):>8}")
    return group, medians


def main(args):
    specs = _variables.model_specs(args.model)
    weights, grads = _variables.make_data(specs)
    numel = sum(int(np.prod(s)) for _, s, _ in specs)
    names = opt.selected(opt.parse(args.optimizers), OTHER is not None)
    if not names:
        raise SystemExit("nothing to time")
    designated = sum(d for *_, d in specs)
    print(
        f"{args.model}: {len(specs)} variables, {numel / 1e6:.2f} M parameters "
        f"({designated} designated spherical); backend "
        f"{keras.backend.backend()}; modes {args.modes}; {names}"
    )
    result = {
        "machine": machine(),
        "model": args.model,
        "backend": args.backend,
        "compare": getattr(OTHER, "__file__", None),
        "variables": len(specs),
        "parameters": numel,
        "designated": designated,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "all_pass": args.all_pass,
        "groups": {},
    }
    if args.backend == "torch" or "official" in args.modes:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        result["torch_threads"] = torch.get_num_threads()
        result["torch"] = torch.__version__
    all_medians = {}
    for mode in args.modes:
        group, medians = run_group(args, mode, names, specs, weights, grads)
        result["groups"][mode] = group
        all_medians.update({f"{n} [{mode}]": t for n, t in medians.items()})
        keras.backend.clear_session()
        gc.collect()
    # Ours (Keras) against the official torch code: same process and
    # threads, but not interleaved (two groups).
    result["vs_official"] = {
        f"{ours} [{mode}]/{official}": all_medians[f"{ours} [{mode}]"]
        / all_medians[f"{official} [official]"]
        for mode in args.modes
        if mode != "official"
        for ours, official in opt.OFFICIAL.items()
        if f"{ours} [{mode}]" in all_medians and f"{official} [official]" in all_medians
    }
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
        f"{m.get('cpus')} CPUs, load {format_load(m.get('loadavg_start'))} -> "
        f"{format_load(m.get('loadavg_end'))}"
    )
    columns = (
        f"{'mode':<15} {'pair':<32} {'ours ms':>9} {'base ms':>9} {'step':>6} "
        f"{'stepCPU':>7} {'first':>6} {'1st CPU':>7} {'size':>6}"
    )
    lines = [header, columns]

    def ratio(d, x, y):
        return f"{d[x] / d[y]:.2f}" if d.get(x) and d.get(y) else "-"

    for mode, group in result["groups"].items():
        med = group.get("median_ms", {})
        first = group.get("first_call_s", {})
        size = group.get("program_size", {})
        pairs = opt.OFFICIAL_PAIRS if mode == "official" else opt.pairs(list(med))
        for a, b in pairs:
            if a not in med or b not in med:
                continue
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


def run_modes_apart(args, argv):
    """TensorFlow with several modes: each mode in its own process (a
    process that compiled 10 optimizers x 4 modes on ResNet-50 holds ~10 GB),
    merged into one result."""
    passed = without(argv, ("--backend", "--json", "--modes", "--timeout"))
    passed = [a for a in passed if a not in ("--no-xla", "--only-xla")]
    result = {"groups": {}}
    for mode in args.modes:
        part = run_json(
            __file__,
            ["--backend", args.backend, "--modes", mode, *passed],
            args.timeout,
        )
        groups = part.pop("groups", {mode: {"mode": mode, "error": part.get("error")}})
        if "machine" not in result and "machine" in part:
            result.update(part)
        result["groups"].update(groups)
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
    passed = without(argv, ("--backend", "--json"))
    results = {b: run_json(__file__, ["--backend", b, *passed], None) for b in BACKENDS}
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
