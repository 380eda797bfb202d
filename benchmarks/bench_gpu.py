"""The GPU set in one command: ResNet-50 training step and optimizer step,
AdamP and SGDP against AdamW and SGD, on TensorFlow, JAX and torch.

    python benchmarks/bench_gpu.py --out /tmp/gpu          # on a GPU machine
    python benchmarks/bench_gpu.py --out /tmp/gpu --smoke  # plumbing, on a CPU

What it runs, each backend in its own process with its own time budget
(`--budget` 85 s for the training step, killed 15 s later, keeping the
configurations done; `--step-budget` 60 s for the optimizer step: at most
8 minutes for the three), in this order of priority, skipping what the budget no longer
allows and what a backend can't do, each skip with its reason:

1. Training step: `model.train_on_batch` of
   `keras.applications.ResNet50(weights=None)` (logits, sparse categorical
   cross-entropy) on one fixed random batch held on the device, each
   optimizer training its own copy of the model from the same weights,
   timed in interleaved rounds in the same process (medians, ratios
   AdamP/AdamW and SGDP/SGD), first call (trace + compile + step) timed
   alone. Configurations: batch 256 and 32; mixed precision
   (`mixed_float16` on TensorFlow and torch, `mixed_bfloat16` on JAX;
   `--mixed` to choose) and float32; `jit_compile` on (XLA) and off. JAX
   always compiles with XLA (its non-XLA rows are skipped with the reason);
   torch has no XLA (Keras's `jit_compile` on torch is `torch.compile`, not
   timed here): its rows run eager, once per batch and precision.
2. Optimizer step: `bench_step.py` on the ResNet-50 variable set (AdamP,
   SGDP, AdamSRT, SGDMRT and their bases; TF and JAX with XLA, torch eager
   with the official torch code), in its own process.

Writes `DIR/gpu.json` (device name, machine, keras_adamp commit, load, one
entry per backend: `train` rows and the `step` result) and prints a summary
(also in `DIR/gpu.txt`). `--smoke` runs the same plumbing on a small model
(ResNet-20-like, batch 2, 1 step, 1 round) so that a CPU-only machine can
check it in a minute or two per backend.

Run from the repository root (or with keras_adamp importable).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import emit
from _common import format_load
from _common import loadavg
from _common import machine
from _common import run_json
from _common import run_tagged
from _common import select_backend
from _common import time_rounds

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax", "torch")
MIXED = {
    "tensorflow": "mixed_float16",
    "jax": "mixed_bfloat16",
    "torch": "mixed_float16",
}


def train_plan(backend, smoke, mixed):
    """[(batch, policy, jit, optimizers)], most wanted first. torch has no
    XLA: its rows run eager, once each."""
    both = ("AdamP", "AdamW", "SGDP", "SGD")
    adam = ("AdamP", "AdamW")
    if smoke:
        plan = [(2, mixed, True, both), (2, "float32", False, adam)]
    else:
        plan = [
            (256, mixed, True, both),
            (32, mixed, True, both),
            (256, "float32", True, adam),
            (256, mixed, False, adam),
            (32, "float32", True, adam),
            (32, mixed, False, adam),
            (256, "float32", False, adam),
            (32, "float32", False, adam),
        ]
    if backend != "torch":
        return plan
    eager, seen = [], set()
    for batch, policy, _, names in plan:
        if (batch, policy) not in seen:
            seen.add((batch, policy))
            eager.append((batch, policy, False, names))
    return eager


def skip_reason(backend, jit):
    if backend == "jax" and not jit:
        return "JAX compiles every step with XLA: there is no non-XLA mode"
    return None


def device_name(backend):
    """The accelerator this backend runs on, in words (or why none)."""
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if not gpus:
                return None
            details = tf.config.experimental.get_device_details(gpus[0])
            return details.get("device_name", gpus[0].name)
        if backend == "jax":
            import jax

            d = jax.devices()[0]
            return None if d.platform == "cpu" else f"{d.platform}: {d.device_kind}"
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return None
    except Exception as error:  # noqa: BLE001 (a report, not a failure)
        return f"unknown ({error})"


def child(args):
    """One backend: the training-step configurations in order, within the
    budget; prints one JSON line."""
    select_backend(args.backend)
    start = time.perf_counter()
    deadline = start + args.budget
    import keras

    out = {
        "backend": args.backend,
        "device": device_name(args.backend),
        "machine": machine(),
        "train": [],
    }
    emit("HEAD", out)
    if out["device"] is None and not args.smoke:
        out["skipped"] = f"{args.backend} sees no GPU"
        emit("RESULT", out)
        return
    rounds, steps, warmup = (1, 1, 0) if args.smoke else (args.rounds, args.steps, 2)
    mixed = args.mixed or MIXED[args.backend]
    for batch, policy, jit, names in train_plan(args.backend, args.smoke, mixed):
        row = {"batch": batch, "policy": policy, "jit_compile": jit}
        reason = skip_reason(args.backend, jit)
        # Roughly: a configuration needs its compiles and rounds; do not
        # start one with less than a quarter of the budget left (the parent
        # kills the process 15 s after the budget, keeping the rows done).
        if reason is None and time.perf_counter() > deadline - args.budget / 4:
            reason = "time budget spent"
        if reason:
            row["skipped"] = reason
            out["train"].append(row)
            emit("ROW", row)
            print(f"  skip batch {batch} {policy} jit={jit}: {reason}", flush=True)
            continue
        print(f"\n== train batch {batch}, {policy}, jit_compile={jit}", flush=True)
        try:
            row.update(
                train_config(args, batch, policy, jit, names, rounds, steps, warmup)
            )
        except Exception as error:  # noqa: BLE001 (one configuration, not the run)
            row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            print(f"  failed: {row['error']}", flush=True)
        out["train"].append(row)
        emit("ROW", row)  # kept if killed later
        keras.backend.clear_session()
    out["elapsed_s"] = time.perf_counter() - start
    out["loadavg_end"] = loadavg()
    emit("RESULT", out)


def train_config(args, batch, policy, jit, names, rounds, steps, warmup):
    """One training-step configuration: each optimizer trains its own copy
    of the model from the same weights, in interleaved rounds."""
    import _optimizers
    import bench_train
    import keras
    import numpy as np

    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model_name = "resnet20" if args.smoke else "resnet50"
        reference, input_shape, classes = bench_train.build_model(model_name)
        initial = reference.get_weights()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch,) + input_shape).astype("float32")
        y = rng.integers(0, classes, size=(batch,)).astype("int32")
        # The batch lives on the device: the step moves no data.
        x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
        if args.backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_logical_devices("GPU"):
                with tf.device("/GPU:0"):
                    x, y = tf.identity(x), tf.identity(y)
        steppers = {}
        for name in names:
            model, _, _ = bench_train.build_model(model_name)
            model.set_weights(initial)
            model.compile(
                optimizer=_optimizers.factory(name, designated=None)(),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=jit,
            )
            steppers[name] = lambda model=model: model.train_on_batch(x, y)
        times, first = time_rounds(steppers, rounds, steps, warmup)
    finally:
        keras.config.set_dtype_policy("float32")
    medians = {n: 1e3 * statistics.median(t) for n, t in times.items()}

    def ratios(values):
        return {
            f"{a}/{b}": values[a] / values[b]
            for a, b in bench_train.PAIRS
            if a in values and b in values
        }

    return {
        "median_ms": medians,
        "times_ms": {n: [1e3 * v for v in t] for n, t in times.items()},
        "ratios": ratios(medians),
        "first_call_s": first,
        "first_call_ratios": ratios(first),
        "loadavg": loadavg(),
    }


def run_backend(args, backend):
    """The backend's training-step child, then its optimizer-step run."""
    result = {}
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--backend",
        backend,
        "--budget",
        str(args.budget),
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
    ]
    if args.smoke:
        cmd.append("--smoke")
    if args.mixed:
        cmd += ["--mixed", args.mixed]
    print(f"\n#### {backend}: training step", flush=True)
    result["train"] = _run(cmd, args.budget + 15)
    device = result["train"].get("device")
    if device is None and not args.smoke:
        result["step"] = {"skipped": f"{backend} sees no GPU"}
        return result
    modes = {"tensorflow": "xla", "jax": "xla", "torch": "eager,official"}[backend]
    step_args = ["--backend", backend, "--optimizers", "AdamP,SGDP,AdamSRT,SGDMRT"]
    step_args += ["--modes", modes]
    if args.smoke:
        step_args += ["--model", "resnet18ish", "--rounds", "1", "--steps", "1"]
        step_args += ["--warmup", "0"]
    else:
        step_args += ["--rounds", "3", "--steps", "5", "--warmup", "2"]
    print(f"\n#### {backend}: optimizer step", flush=True)
    result["step"] = run_json(
        os.path.join(HERE, "bench_step.py"), step_args, args.step_budget
    )
    with open(os.path.join(args.out, f"step_{backend}.json"), "w") as f:
        json.dump(result["step"], f, indent=1)
    return result


def _run(cmd, timeout):
    """Runs a training-step child; its result, or what its HEAD and ROW
    lines gave before it was killed."""
    lines, error = run_tagged(cmd, timeout, echo=True)
    result = (lines.get("RESULT") or lines.get("HEAD") or [{}])[-1]
    rows = lines.get("ROW", [])
    if rows and len(rows) > len(result.get("train", [])):
        result["train"] = rows
    if error:
        result["error"] = error
    return result


def nvidia_smi():
    try:
        proc = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def summary(result):
    lines = [
        (
            f"GPU set: {result.get('nvidia_smi') or 'no nvidia-smi'}; "
            f"load {format_load(result.get('loadavg_start'))} -> "
            f"{format_load(result.get('loadavg_end'))}"
        )
    ]
    for backend, r in result["backends"].items():
        train = r.get("train", {})
        lines.append(
            f"{backend}: device {train.get('device')}"
            + (f" ({train['skipped']})" if "skipped" in train else "")
            + (f" ({train['error']})" if "error" in train else "")
        )
        for row in train.get("train", []):
            head = (
                f"  train batch {row['batch']:>3} {row['policy']:<14} "
                f"jit={'on ' if row['jit_compile'] else 'off'}"
            )
            if "skipped" in row or "error" in row:
                lines.append(f"{head}  skipped: {row.get('skipped') or row['error']}")
                continue
            med = row["median_ms"]
            lines.append(
                head
                + "  "
                + ", ".join(
                    f"{k} {v:.3f} ({med[k.split('/')[0]]:.1f}/"
                    f"{med[k.split('/')[1]]:.1f} ms)"
                    for k, v in row["ratios"].items()
                )
                + "; first call "
                + ", ".join(f"{k} {v:.2f}" for k, v in row["first_call_ratios"].items())
            )
        step = r.get("step", {})
        for mode, group in step.get("groups", {}).items():
            rs = group.get("ratios", {})
            lines.append(
                f"  step {mode:<8} "
                + ", ".join(f"{k} {v:.2f}" for k, v in rs.items() if " cpu" not in k)
            )
        if step.get("vs_official"):
            lines.append(
                "  step vs official: "
                + ", ".join(f"{k} {v:.2f}" for k, v in step["vs_official"].items())
            )
        if "skipped" in step or "error" in step:
            lines.append(f"  step: {step.get('skipped') or step.get('error')}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory for the JSON (required)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="small model, batch 2, 1 step: the plumbing on a CPU",
    )
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--budget",
        type=int,
        default=85,
        help="seconds for a backend's training-step configurations",
    )
    parser.add_argument(
        "--step-budget",
        type=int,
        default=60,
        help="seconds for a backend's optimizer-step run",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--mixed", help="mixed policy (default: per backend)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and not args.out:
        parser.error("--out DIR is required")
    return args


def main(args):
    os.makedirs(args.out, exist_ok=True)
    result = {
        "nvidia_smi": nvidia_smi(),
        "smoke": args.smoke,
        "loadavg_start": loadavg(),
        "backends": {},
    }
    print(f"device: {result['nvidia_smi'] or 'nvidia-smi not found'}", flush=True)
    if args.smoke:
        # No per-backend limits worth keeping on a slow CPU: the plumbing is
        # what is tested.
        args.budget, args.step_budget = (
            max(args.budget, 600),
            max(args.step_budget, 900),
        )
    for backend in args.backends.split(","):
        result["backends"][backend] = run_backend(args, backend)
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(result, f, indent=1)  # what is done so far
    result["loadavg_end"] = loadavg()
    text = summary(result)
    print("\n" + text)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu.txt"), "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.join(args.out, 'gpu.json')} and gpu.txt")


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.child:
        child(ARGS)
    else:
        main(ARGS)
