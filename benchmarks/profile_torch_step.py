"""Where the torch executor's SGDP and SGDMRT steps spend their time.

On the trainable variables of `keras.applications.ResNet50(weights=None)`
(the fixed random weights and gradients and the hyperparameters of
`bench_step.py`: `_variables.py`, `_optimizers.py`), times in CPU
seconds of this process (less sensitive to other processes' load than wall
time), interleaved round by round, medians:

* one `optimizer.apply` of SGDP (momentum 0.9, Nesterov) and of SGDMRT
  (momentum 0.9, on the kernels followed by BatchNorm), and of their Keras
  bases, SGD with and without Nesterov;
* inside them, the per-channel sums (`_torch._sums`) and, for SGDP, the
  batched decision (`_torch._decide`);
* two unit passes over a buffer of the parameters' size: one that reads
  and writes it (`x.mul_(1)`) and one that also reads a second one
  (`x.add_(y)`); every other op of a step moves about as much memory as
  one of these.

    python benchmarks/profile_torch_step.py --rounds 7 --threads 1

Run from the repository root (or with keras_adamp importable).
"""

import argparse
import statistics
import time
import warnings

from _common import format_load
from _common import loadavg
from _common import select_backend

select_backend("torch")

import _optimizers
import _variables
import torch
from _steps import backend_tensors

from keras_adamp import _torch

# The layouts are guessed from these shapes (the variables carry no layer):
# the warning saying so is noise here.
warnings.filterwarnings("ignore", message=".*output channels of .* guessed")

#: Ours and their Keras bases, with bench_step.py's hyperparameters.
NAMES = ("SGDP", "SGD", "SGDMRT", "SGD-plain")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = _variables.model_specs("resnet50")
    weights, grads = _variables.make_data(specs)
    grads = backend_tensors(grads)
    runs, phases = {}, {}
    for name in NAMES:
        variables, designated = _variables.keras_variables(specs, weights)
        optimizer = _optimizers.factory(name, designated)()
        optimizer.build(variables)

        def run(optimizer=optimizer, variables=variables, name=name):
            wrapped = {}
            for attr in ("_sums", "_decide"):
                wrapped[attr] = original = getattr(_torch, attr)

                def timed(*a, original=original, key=(name, attr)):
                    c0 = time.process_time()
                    result = original(*a)
                    phases[key] = phases.get(key, 0.0) + time.process_time() - c0
                    return result

                setattr(_torch, attr, timed)
            try:
                with torch.no_grad():
                    optimizer.apply(grads, variables)
            finally:
                for attr, original in wrapped.items():
                    setattr(_torch, attr, original)

        runs[name] = run
    size = sum(w.size for w in weights)
    x, y = torch.ones(size), torch.zeros(size)
    runs["pass: read+write 1"] = lambda: x.mul_(1.0)
    runs["pass: read 2, write 1"] = lambda: x.add_(y)
    for run in runs.values():
        run()  # builds nothing more; first calls out of the rounds
    phases.clear()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            c0 = time.process_time()
            run()
            times[name].append(time.process_time() - c0)
    median = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"{size / 1e6:.1f} M parameters, {args.threads} torch thread(s)")
    for name, ms in median.items():
        print(f"{name:24s} {ms:7.1f} ms CPU")
        for (owner, attr), seconds in sorted(phases.items()):
            if owner == name:
                print(f"  {attr:22s} {1e3 * seconds / args.rounds:7.1f} ms CPU")
    print(f"SGDP/SGD {median['SGDP'] / median['SGD']:.2f}")
    print(f"SGDMRT/SGD-plain {median['SGDMRT'] / median['SGD-plain']:.2f}")
    print("load", format_load(loadavg()))


if __name__ == "__main__":
    main()
