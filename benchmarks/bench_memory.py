"""Extra peak resident memory of an optimizer step, in units of the
parameters' size: the five optimizers against Keras's own (and the official
torch code), one process per configuration (optimizer x backend x mode).

Each configuration runs in a fresh process, which:

1. creates 16 float32 kernels of 2048x2048 (256 MiB of parameters; each
   designated spherical for AdamS/AdamSRT/SGDMRT) and fixed random gradients
   of the same size, as backend tensors;
2. builds the optimizer (its slots) and the step as `bench_step.py` runs it,
   prepared as far as it can be without running it: TF:
   `tf.function(optimizer.apply)` traced, `jit_compile` on ("xla") or off
   ("graph"); JAX: `jax.jit(stateless_apply)` with the state donated,
   compiled ahead of time (`.lower().compile()`); torch: eager
   `optimizer.apply` under `no_grad`; "official": the `adamp` /
   `torch.optim` optimizer's `step()` on torch parameters;
3. collects garbage and reads the resident set size `base` (`VmRSS` in
   /proc/self/status);
4. resets the kernel's high-water mark of the resident set to the current
   size (writing "5" to /proc/self/clear_refs), runs `--steps` (3) steps,
   each waited for, and reads the high-water mark `peak` (`VmHWM`).

Each process runs with glibc's `MALLOC_MMAP_THRESHOLD_=1048576` (unless
`--default-malloc`): every buffer over 1 MiB is then its own mapping, given
back when freed, so that the resident size follows the live buffers. With
glibc's default the threshold grows to 32 MiB as soon as one such buffer is
freed, and the heap then keeps freed 16 MiB buffers for reuse: the figure
would depend on what the process freed before (measured on torch: AdamW
3.46 with the default, 3.02 with the fixed threshold; steps 2-3 alone then
agree with the first). XLA's and JAX's own allocators are not affected.

The figure, `extra = (peak - base) / parameter bytes`, is the memory the
steps need beyond the variables, slots, gradients and the prepared step:
what a step holds only while it runs (temporaries, an update held until a
decision, a new buffer for an assignment not done in place). The first step
is included on purpose: the allocators (glibc's, XLA's) keep what a step
freed and the next steps reuse it, so the peak after a warm-up step shows
~0 on TensorFlow whatever the step needs. On TF with XLA the first step
also compiles (it can't be separated there); the base optimizer pays the
same and the ratio is what the targets compare (ours <= base + 0.10).
Also written per run: `first_step_extra`, `later_steps_extra` (steps 2-3
over the resident size after step 1) and the resident size after the
variables, the build, the preparation and step 1, in parameter units.
Linux only (reads /proc).

    python benchmarks/bench_memory.py                   # all: ~10 min on 2 CPUs
    python benchmarks/bench_memory.py --backends tensorflow --modes xla \\
        --optimizers AdamP,SGDP --json mem.json
    python benchmarks/bench_memory.py --kernels 2 --size 256   # smoke
    python benchmarks/bench_memory.py --summary mem.json       # its table again

Run from the repository root (or with keras_adamp importable).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from _common import loadavg
from _common import select_backend
from _common import write_json

MODES = {
    "tensorflow": ("xla", "graph"),
    "jax": ("xla",),
    "torch": ("eager", "eager-nograd", "official"),
}
#: Same names and pairs as bench_step.py.
BASES = {
    "AdamP": "AdamW",
    "SGDP": "SGD",
    "SGDP-plain": "SGD-plain",
    "AdamS": "Adam",
    "AdamSRT": "Adam",
    "SGDMRT": "SGD-plain",
}
OFFICIAL = ("AdamP", "AdamW", "SGDP", "SGD", "SGDP-plain", "SGD-plain")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes():
    return 1024 * _status_kb("VmRSS")


def reset_peak():
    """Sets the high-water mark of the resident set to its current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes():
    return 1024 * _status_kb("VmHWM")


def child(args):
    """Measures one configuration; prints one JSON line."""
    select_backend(args.backend)
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_step
    import keras

    rng = np.random.default_rng(0)
    shape = (args.size, args.size)
    param_bytes = 4 * args.kernels * args.size * args.size
    weights = [
        rng.normal(0, 0.05, shape).astype("float32") for _ in range(args.kernels)
    ]
    grads = [rng.normal(0, 1e-3, shape).astype("float32") for _ in range(args.kernels)]
    record = {
        "backend": args.backend,
        "mode": args.mode,
        "optimizer": args.optimizer,
        "parameter_bytes": param_bytes,
    }
    marks = {"start": rss_bytes()}
    if args.mode == "official":
        if args.optimizer not in bench_step.OFFICIAL:
            raise SystemExit(f"no official counterpart of {args.optimizer}")
        step_fn = _official_step(bench_step, args.optimizer, weights, grads, marks)
        record["optimizer"] = bench_step.OFFICIAL[args.optimizer]
    else:
        variables = [
            keras.Variable(w, name=f"kernel_{i}") for i, w in enumerate(weights)
        ]
        marks["variables"] = rss_bytes()
        optimizer = bench_step.factory(args.optimizer, lambda: list(variables))()
        optimizer.build(variables)
        marks["built"] = rss_bytes()
        step_fn = _keras_step(args.backend, args.mode, optimizer, variables, grads)
    del weights, grads
    gc.collect()
    base = rss_bytes()
    marks["prepared"] = base
    reset_peak()
    t0 = time.perf_counter()
    step_fn()  # the first step (and, on TF with XLA, its compilation)
    record["first_step_s"] = time.perf_counter() - t0
    first_peak = peak_bytes()
    after_first = rss_bytes()
    marks["after_first_step"] = after_first
    reset_peak()
    t0 = time.perf_counter()
    for _ in range(args.steps - 1):
        step_fn()
    record["later_steps_s"] = time.perf_counter() - t0
    later_peak = peak_bytes()
    peak = max(first_peak, later_peak)
    record["extra"] = (peak - base) / param_bytes
    record["first_step_extra"] = (first_peak - base) / param_bytes
    record["later_steps_extra"] = (later_peak - after_first) / param_bytes
    record["base_bytes"] = base
    record["peak_bytes"] = peak
    record["rss"] = {k: (v - marks["start"]) / param_bytes for k, v in marks.items()}
    if args.backend == "torch":
        import torch

        record["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(record), flush=True)


def _keras_step(backend, mode, optimizer, variables, grads):
    import keras

    if backend == "tensorflow":
        import tensorflow as tf

        tf_grads = [tf.constant(g) for g in grads]
        fn = tf.function(bench_apply(optimizer, variables), jit_compile=(mode == "xla"))
        # Traced ahead; XLA compiles it in the first call only.
        fn.get_concrete_function(tf_grads)
        return lambda: fn(tf_grads).numpy()
    if backend == "jax":
        import jax

        jax_grads = [jax.numpy.array(g, copy=True) for g in grads]
        # Copies that JAX owns: a buffer made from a NumPy array can alias
        # NumPy's memory, and then XLA copies it instead of reusing it
        # when donated (the first step would hold a copy of the state).
        state = {
            "train": [jax.numpy.array(v.value, copy=True) for v in variables],
            "opt": [jax.numpy.array(v.value, copy=True) for v in optimizer.variables],
        }
        # Compiled ahead of time: the measured steps run it only.
        fn = (
            jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))
            .lower(state["opt"], jax_grads, state["train"])
            .compile()
        )

        def run():
            train, opt = fn(state["opt"], jax_grads, state["train"])
            state["train"], state["opt"] = train, opt
            jax.block_until_ready(train)

        return run
    import contextlib

    import torch

    torch_grads = [keras.ops.convert_to_tensor(g) for g in grads]
    context = torch.no_grad if mode == "eager-nograd" else contextlib.nullcontext

    def run():
        with context():
            optimizer.apply(torch_grads, variables)

    return run


def bench_apply(optimizer, variables):
    def apply(grads):
        optimizer.apply(grads, variables)
        return optimizer.iterations

    return apply


def _official_step(bench_step, name, weights, grads, marks):
    """The official code's optimizer on torch parameters (PyTorch layout)."""
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(w.T.copy())) for w in weights]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g.T.copy())
    marks["variables"] = rss_bytes()
    optimizer = _official_factory(bench_step, name)(params)
    marks["built"] = rss_bytes()

    def run():
        with torch.no_grad():
            optimizer.step()

    return run


def _official_factory(bench_step, name):
    import adamp
    import torch

    s = bench_step
    return {
        "AdamP": lambda p: adamp.AdamP(
            p, lr=s.LR_ADAM, weight_decay=s.WEIGHT_DECAY_ADAM
        ),
        "AdamW": lambda p: torch.optim.AdamW(
            p, lr=s.LR_ADAM, weight_decay=s.WEIGHT_DECAY_ADAM, eps=1e-8
        ),
        "SGDP": lambda p: adamp.SGDP(
            p,
            lr=s.LR_SGD,
            momentum=s.MOMENTUM,
            nesterov=True,
            weight_decay=s.WEIGHT_DECAY_SGD,
        ),
        "SGD": lambda p: torch.optim.SGD(
            p,
            lr=s.LR_SGD,
            momentum=s.MOMENTUM,
            nesterov=True,
            weight_decay=s.WEIGHT_DECAY_SGD,
        ),
        "SGDP-plain": lambda p: adamp.SGDP(
            p, lr=s.LR_SGD, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY_SGD
        ),
        "SGD-plain": lambda p: torch.optim.SGD(
            p, lr=s.LR_SGD, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY_SGD
        ),
    }[name]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends",
        default="tensorflow,jax,torch",
        help="comma-separated (default: all three)",
    )
    parser.add_argument(
        "--modes",
        help="comma-separated, of xla, graph (TensorFlow), xla (JAX), eager, "
        "official (torch); default: every mode of each backend",
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(BASES),
        help="ours and/or Keras's names, as in bench_step.py (each of ours "
        "brings its base); default: all",
    )
    parser.add_argument("--kernels", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048, help="kernel side")
    parser.add_argument("--steps", type=int, default=3, help="measured steps")
    parser.add_argument(
        "--repeat", type=int, default=1, help="processes per configuration (median)"
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds per process")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's mmap threshold as it is (see the docstring)",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--summary", metavar="JSON", help="print the summary of a written JSON"
    )
    # One configuration, in this process (what the parent runs).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def configurations(args):
    names = []
    for n in (x.strip() for x in args.optimizers.split(",") if x.strip()):
        for m in (n, BASES.get(n)):
            if m and m not in names:
                names.append(m)
    wanted = args.modes.split(",") if args.modes else None
    for backend in args.backends.split(","):
        for mode in MODES[backend]:
            if wanted and mode not in wanted:
                continue
            for name in names:
                if mode == "official" and name not in OFFICIAL:
                    continue
                yield backend, mode, name


def run_one(args, backend, mode, name):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--backend",
        backend,
        "--mode",
        mode,
        "--optimizer",
        name,
        "--kernels",
        str(args.kernels),
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
    ]
    env = dict(os.environ)
    if not args.default_malloc:
        # A fixed threshold: every buffer over 1 MiB is its own mapping,
        # returned to the system when freed, so that the resident size
        # follows the live buffers (glibc's default threshold grows to 32
        # MiB once such a buffer is freed, and the heap then keeps and
        # reuses freed 16 MiB buffers: the figure would depend on history).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}


def main(args):
    from _common import machine

    select_backend("tensorflow" if "tensorflow" in args.backends else "torch")
    result = {
        "machine": machine(),
        "kernels": args.kernels,
        "size": args.size,
        "steps": args.steps,
        "repeat": args.repeat,
        "parameter_mib": 4 * args.kernels * args.size**2 / 2**20,
        "definition": "extra = (VmHWM over the steps - VmRSS before them, "
        "with variables, slots, gradients and the traced (JAX: compiled) step) "
        "/ parameter bytes; one process per configuration",
        "malloc": "default"
        if args.default_malloc
        else os.environ.get("MALLOC_MMAP_THRESHOLD_", str(2**20)),
        "runs": [],
        "extra": {},
        "later_steps_extra": {},
    }
    configs = list(configurations(args))
    print(
        f"{len(configs)} configurations x {args.repeat}, {args.kernels} kernels "
        f"of {args.size}x{args.size} ({result['parameter_mib']:.0f} MiB), "
        f"{args.steps} steps; load {loadavg()}",
        flush=True,
    )
    for backend, mode, name in configs:
        runs = []
        for _ in range(args.repeat):
            record = run_one(args, backend, mode, name)
            record.update(backend=backend, mode=mode, config=name)
            record["loadavg"] = loadavg()
            result["runs"].append(record)
            runs.append(record)
        extras = [r["extra"] for r in runs if "extra" in r]
        key = f"{backend} {mode} {name}"
        if extras:
            result["extra"][key] = statistics.median(extras)
            later = statistics.median(
                r["later_steps_extra"] for r in runs if "extra" in r
            )
            result["later_steps_extra"][key] = later
            print(
                f"  {key:<32} extra {result['extra'][key]:5.2f} "
                f"(after the first step: {later:5.2f})",
                flush=True,
            )
        else:
            print(f"  {key:<32} {runs[-1].get('error')}")
    result["machine"]["loadavg_end"] = loadavg()
    print()
    print(summary(result))
    write_json(args.json, result)
    return result


def summary(result):
    """ours vs base, per backend and mode: extra peak in parameter units,
    the difference, and whether it meets issue 17's target (<= base + 0.10)."""
    extra = result["extra"]
    title = (
        f"extra peak resident memory of {result['steps']} steps, "
        f"{result['kernels']} kernels of {result['size']}x{result['size']}, "
        "in units of the parameters' size"
    )
    lines = [
        title,
        (
            f"{'backend mode':<20} {'pair':<22} {'ours':>6} {'base':>6} {'diff':>6}"
            f"   after step 1: {'ours':>6} {'base':>6}"
        ),
    ]
    later = result.get("later_steps_extra", {})
    keys = list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in extra))
    for where in keys:
        for ours, base in BASES.items():
            a, b = extra.get(f"{where} {ours}"), extra.get(f"{where} {base}")
            if a is None or b is None:
                continue
            lines.append(
                f"{where:<20} {ours + '/' + base:<22} {a:6.2f} {b:6.2f} {a - b:+6.2f}"
                f"                 {later.get(f'{where} {ours}', float('nan')):6.2f} "
                f"{later.get(f'{where} {base}', float('nan')):6.2f}"
                + ("" if a - b <= 0.10 else "  (over base + 0.10)")
            )
    return "\n".join(lines)


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.summary:
        with open(ARGS.summary) as f:
            print(summary(json.load(f)))
    elif ARGS.child:
        child(ARGS)
    else:
        main(ARGS)
