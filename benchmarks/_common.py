"""What the benchmarks share: backend set-up before Keras is imported, the
interleaved timing rounds and their ratios, the machine description, the
JSON output and the child processes (no Keras imported here)."""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def select_backend(backend):
    """Sets KERAS_BACKEND (before `import keras`) and makes the repository's
    keras_adamp importable when run from a checkout."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Appended: a keras_adamp on PYTHONPATH (another checkout, e.g. the
    # "before" of a comparison) wins over this one.
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def time_rounds(steppers, rounds, steps, warmup):
    """``({name: [seconds per step, one per round], name + " cpu": [CPU
    seconds per step]}, {name: first call s, name + " cpu": its CPU s})``.

    Every stepper runs once per round, in turn, so that load from other
    processes hits all configurations alike. The first call (trace and
    compile, timed on its own) and `warmup` more are not in the rounds.
    """
    first = {}
    for name, run in steppers.items():
        t0, c0 = time.perf_counter(), time.process_time()
        run()  # compile
        first[name] = time.perf_counter() - t0
        # CPU seconds of this process (all its threads): what the trace and
        # compile cost, less sensitive than wall time to other processes.
        first[name + " cpu"] = time.process_time() - c0
        print(
            f"  first call {name}: {first[name]:.2f} s "
            f"({first[name + ' cpu']:.2f} s CPU)",
            flush=True,
        )
        for _ in range(warmup):
            run()
    times = {name: [] for name in steppers}
    # CPU seconds of this process per step too (all its threads): on a
    # shared machine they grow less with other processes' load than wall
    # time does (less for a program that spins waiting for its threads).
    times.update({name + " cpu": [] for name in steppers})
    for r in range(rounds):
        for name, run in steppers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - t0) / steps)
            times[name + " cpu"].append((time.process_time() - c0) / steps)
        print(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(
                f"{n} {1e3 * t[-1]:.1f}" for n, t in times.items() if " cpu" not in n
            )
            + " ms",
            flush=True,
        )
    return times, first


def ratio_table(values, pairs, label):
    """{"A/B [mode]": values[A [mode]] / values[B [mode]]} for each pair
    present in `values` (names "A" or "A [mode]"), printed under `label`."""
    ratios = {}
    for name in values:
        for ours, base in pairs:
            if name == ours or name.startswith((ours + " [", ours + " cpu")):
                other = base + name[len(ours) :]
                if other in values:
                    ratios[f"{ours}/{other}"] = values[name] / values[other]
    print(f"{label}:")
    for n, r in ratios.items():
        print(f"  {n:<34} {r:6.3f}")
    return ratios


def machine():
    """Where the figures were measured."""
    import keras

    import keras_adamp

    info = {
        "keras_adamp": os.path.dirname(os.path.abspath(keras_adamp.__file__)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info.update(package_commit(info["keras_adamp"]))
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def package_commit(package_dir):
    """The git commit of the checkout that holds `package_dir`: its HEAD, the
    last commit that changed the package, and whether the package differs
    from HEAD (uncommitted edits). Empty outside a git checkout."""

    def git(*args):
        return subprocess.run(
            ["git", "-C", package_dir, *args],
            capture_output=True,
            check=False,
            text=True,
            timeout=30,
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return {}
        last = git("log", "-1", "--format=%h", "--", ".")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        "commit": head.stdout.strip(),
        "package_commit": last.stdout.strip(),
        "package_dirty": bool(dirty.stdout.strip()),
    }


def format_load(value):
    """A load average triple as "1.0/1.2/1.3" ("?" if unknown)."""
    return "/".join(f"{x:.1f}" for x in value) if value else "?"


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


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def write_json(path, result):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


def without(argv, options):
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


def run_json(script, args, timeout):
    """Runs `script` with `args` and `--json FILE` in a child process (its
    output shown as it comes); the JSON it wrote, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(script), *args, "--json", out]
        print(f"\n#### {' '.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, check=False, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        return {"error": f"exit {rc}"}


def emit(tag, record):
    """One tagged JSON line on stdout, what `run_tagged` reads back."""
    print(f"{tag} {json.dumps(record)}", flush=True)


def run_tagged(cmd, timeout, env=None, echo=False):
    """Runs `cmd`, a child that reports through `emit`; returns `(lines,
    error)`: {tag: [record, ...]} of what it emitted before it ended or was
    killed, and None or why it failed. `echo`: print its other lines."""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        stdout, error = proc.stdout, None
        if proc.returncode:
            error = f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout or ""
        if isinstance(stdout, bytes):
            stdout = stdout.decode(errors="replace")
        error = f"killed after {timeout} s"
    lines = {}
    for line in stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag.isupper() and payload.startswith("{"):
            lines.setdefault(tag, []).append(json.loads(payload))
        elif echo:
            print(line)
    return lines, error
