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

`--optimizers` takes the names of `bench_step.py` (`_optimizers.py`),
`Projected` among them. Run from the repository root (or with keras_adamp
importable).
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time

import _optimizers as opt
from _common import emit
from _common import loadavg
from _common import machine
from _common import run_tagged
from _common import select_backend
from _common import write_json

MODES = {
    "tensorflow": ("xla", "graph"),
    "jax": ("xla",),
    "torch": ("eager", "eager-nograd", "official"),
}
#: glibc's mmap threshold each child runs with (unless --default-malloc).
MMAP_THRESHOLD = str(2**20)


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return 1024 * int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes():
    return _status_bytes("VmRSS")


def peak_bytes():
    return _status_bytes("VmHWM")


def reset_peak():
    """Sets the high-water mark of the resident set to its current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args):
    """Measures one configuration in this process; emits one RESULT line."""
    select_backend(args.backend)
    import _variables
    from _steps import backend_tensors
    from _steps import keras_step
    from _steps import official_step

    specs = _variables.kernel_specs(args.kernels, args.size)
    weights, grads = _variables.make_data(specs)
    param_bytes = 4 * args.kernels * args.size * args.size
    record = {
        "backend": args.backend,
        "mode": args.mode,
        "optimizer": args.optimizer,
        "parameter_bytes": param_bytes,
    }
    marks = {"start": rss_bytes()}
    if args.mode == "official":
        if args.optimizer not in opt.OFFICIAL:
            raise SystemExit(f"no official counterpart of {args.optimizer}")
        record["optimizer"] = opt.OFFICIAL[args.optimizer]
        params = _variables.torch_parameters(weights, grads)
        marks["variables"] = rss_bytes()
        optimizer = opt.official(record["optimizer"], params)
        marks["built"] = rss_bytes()
        step = official_step(optimizer)
    else:
        variables, designated = _variables.keras_variables(specs, weights)
        marks["variables"] = rss_bytes()
        delta = opt.ALL_PASS if args.all_pass else None
        optimizer = opt.factory(args.optimizer, designated, delta=delta)()
        optimizer.build(variables)
        marks["built"] = rss_bytes()
        # Traced (TF) or compiled (JAX) ahead; XLA on TF compiles in step 1.
        grads = backend_tensors(grads)
        step, _ = keras_step(optimizer, variables, grads, args.mode, ahead=True)
    del weights, grads
    gc.collect()
    base = marks["prepared"] = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    step()  # the first step (and, on TF with XLA, its compilation)
    record["first_step_s"] = time.perf_counter() - t0
    first_peak = peak_bytes()
    after_first = marks["after_first_step"] = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    for _ in range(args.steps - 1):
        step()
    record["later_steps_s"] = time.perf_counter() - t0
    later_peak = peak_bytes()
    peak = max(first_peak, later_peak)
    record.update(
        extra=(peak - base) / param_bytes,
        first_step_extra=(first_peak - base) / param_bytes,
        later_steps_extra=(later_peak - after_first) / param_bytes,
        base_bytes=base,
        peak_bytes=peak,
        rss={k: (v - marks["start"]) / param_bytes for k, v in marks.items()},
    )
    if args.backend == "torch":
        import torch

        record["torch_threads"] = torch.get_num_threads()
    emit("RESULT", record)


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
        "eager-nograd, official (torch); default: every mode of each backend",
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(opt.BASES),
        help="names as in bench_step.py (each of ours brings its base); default: ours",
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
    parser.add_argument(
        "--all-pass",
        action="store_true",
        help="every kernel passes the projection's cosine test (as "
        "bench_step.py's --all-pass)",
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
    select_backend("tensorflow" if "tensorflow" in args.backends else "torch")
    names = opt.selected(opt.parse(args.optimizers))
    wanted = args.modes.split(",") if args.modes else None
    for backend in args.backends.split(","):
        for mode in MODES[backend]:
            if wanted and mode not in wanted:
                continue
            for name in names:
                if mode == "official" and name not in opt.OFFICIAL:
                    continue
                yield backend, mode, name


def run_one(args, backend, mode, name):
    cmd = [sys.executable, os.path.abspath(__file__), "--child"]
    cmd += ["--backend", backend, "--mode", mode, "--optimizer", name]
    cmd += ["--kernels", str(args.kernels), "--size", str(args.size)]
    cmd += ["--steps", str(args.steps)] + (["--all-pass"] if args.all_pass else [])
    env = dict(os.environ)
    if not args.default_malloc:
        # A fixed threshold: every buffer over 1 MiB is its own mapping,
        # returned to the system when freed, so that the resident size
        # follows the live buffers (glibc's default threshold grows to 32
        # MiB once such a buffer is freed, and the heap then keeps and
        # reuses freed 16 MiB buffers: the figure would depend on history).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    lines, error = run_tagged(cmd, args.timeout, env)
    if "RESULT" in lines:
        return lines["RESULT"][-1]
    return {"error": error or "no result"}


def main(args):
    configs = list(configurations(args))
    result = {
        "machine": machine(),
        "kernels": args.kernels,
        "size": args.size,
        "steps": args.steps,
        "repeat": args.repeat,
        "all_pass": args.all_pass,
        "parameter_mib": 4 * args.kernels * args.size**2 / 2**20,
        "definition": "extra = (VmHWM over the steps - VmRSS before them, "
        "with variables, slots, gradients and the traced (JAX: compiled) step) "
        "/ parameter bytes; one process per configuration",
        "malloc": "default"
        if args.default_malloc
        else os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD),
        "runs": [],
        "extra": {},
        "later_steps_extra": {},
    }
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
            record.update(backend=backend, mode=mode, config=name, loadavg=loadavg())
            result["runs"].append(record)
            runs.append(record)
        done = [r for r in runs if "extra" in r]
        key = f"{backend} {mode} {name}"
        if not done:
            print(f"  {key:<32} {runs[-1].get('error')}")
            continue
        result["extra"][key] = statistics.median(r["extra"] for r in done)
        later = statistics.median(r["later_steps_extra"] for r in done)
        result["later_steps_extra"][key] = later
        print(
            f"  {key:<32} extra {result['extra'][key]:5.2f} "
            f"(after the first step: {later:5.2f})",
            flush=True,
        )
    result["machine"]["loadavg_end"] = loadavg()
    print()
    print(summary(result))
    write_json(args.json, result)
    return result


def summary(result):
    """ours vs base, per backend and mode: extra peak in parameter units,
    the difference, and whether it meets issue 17's target (<= base + 0.10)."""
    extra = result["extra"]
    later = result.get("later_steps_extra", {})
    title = (
        f"extra peak resident memory of {result['steps']} steps, "
        f"{result['kernels']} kernels of {result['size']}x{result['size']}, "
        "in units of the parameters' size"
    )
    columns = (
        f"{'backend mode':<20} {'pair':<22} {'ours':>6} {'base':>6} {'diff':>6}"
        f"   after step 1: {'ours':>6} {'base':>6}"
    )
    lines = [title, columns]
    places = list(dict.fromkeys(" ".join(k.split(" ", 2)[:2]) for k in extra))
    for where in places:
        names = [k.split(" ", 2)[2] for k in extra if k.startswith(where + " ")]
        for ours, base in opt.pairs(names):
            a, b = extra[f"{where} {ours}"], extra[f"{where} {base}"]
            nan = float("nan")
            lines.append(
                f"{where:<20} {ours + '/' + base:<22} {a:6.2f} {b:6.2f} {a - b:+6.2f}"
                f"                 {later.get(f'{where} {ours}', nan):6.2f} "
                f"{later.get(f'{where} {base}', nan):6.2f}"
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
