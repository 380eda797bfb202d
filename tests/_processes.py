"""Local worker processes for the multi-process tests (test_multiprocess.py,
test_examples.py): free ports on 127.0.0.1, an environment that keeps two
processes within two cores, and a launcher that never leaves one running."""

import os
import socket
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def only_in_pass(backend):
    """Skips the test except in the KERAS_BACKEND=`backend` pass of the suite:
    its processes set their own backend, so once per CI run is enough."""
    import keras

    return pytest.mark.skipif(
        keras.backend.backend() != backend,
        reason=f"runs in the KERAS_BACKEND={backend} pass (its processes set "
        f"their own backend; once per CI run is enough)",
    )


def free_ports(n):
    """`n` distinct ports free on 127.0.0.1 now (held together while picked)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(backend):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["KERAS_BACKEND"] = backend
    env.pop("TF_CONFIG", None)
    # Two processes share the CI's 2 cores: one compute thread each.
    env.update(
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="2",
        OMP_NUM_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        JAX_PLATFORMS="cpu",
    )
    return env


def launch(command, envs, cwd, timeout=240):
    """Starts one process per env, waits for all (each under `timeout`
    seconds), kills any still running by PID, and fails with every log when
    one exits non-zero."""
    procs, logs = [], []
    try:
        for i, env in enumerate(envs):
            # Closed in the `finally` below, after the logs are read.
            log = open(os.path.join(cwd, f"worker{i}.log"), "w+")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    command(i), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
                )
            )
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        shown = "\n".join(
            f"--- worker {i} (exit {c}) ---\n{t[-3000:]}"
            for i, (c, t) in enumerate(zip(codes, texts))
        )
        pytest.fail(f"workers failed or timed out ({timeout} s):\n{shown}")
    return texts
