"""Time of the first `diagnostics.scale_invariance_report` on MobileNetV2
(weights=None), compilation included, as a user meets it. One backend per
process:

    python benchmarks/bench_report.py --backend tensorflow
    python benchmarks/bench_report.py --backend jax --json report_jax.json
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tensorflow")
    parser.add_argument("--size", type=int, default=96, help="image side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="reports timed (the first one is the figure)",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    _common.select_backend(args.backend)

    import keras
    import numpy as np

    import keras_adamp
    from keras_adamp import diagnostics

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(args.size, args.size, 3), classes=10
    )
    model.compile(optimizer=keras_adamp.AdamP(), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch)
    result = {"machine": _common.machine(), "size": args.size, "batch": args.batch}
    result["report_s"] = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        rows = diagnostics.scale_invariance_report(model, x, y)
        result["report_s"].append(time.perf_counter() - t0)
        print(
            f"{args.backend} report {i + 1}: {result['report_s'][-1]:.2f} s "
            f"({len(rows)} variables, load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    print(diagnostics.format_report(rows).splitlines()[-1])
    result["variables"] = len(rows)
    result["machine"]["loadavg_end"] = _common.loadavg()
    _common.write_json(args.json, result)


if __name__ == "__main__":
    main()
