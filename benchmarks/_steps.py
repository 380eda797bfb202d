"""One optimizer step, prepared as each backend runs it in training, as a
function of no arguments that runs it and waits for it; and the size of the
program it compiles.

* TensorFlow: `tf.function(optimizer.apply)`, `jit_compile` on ("xla") or
  off ("graph"); with a strategy, as Keras's trainer runs a step under one:
  the `tf.function` of `strategy.run(step)`.
* JAX: `jax.jit(optimizer.stateless_apply)` with the state donated.
* torch: eager `optimizer.apply(grads, variables)`, under `torch.no_grad()`
  for "eager-nograd" (as Keras's torch trainer calls it).
* The official PyTorch code: the torch optimizer's `step()`.

Import after `_common.select_backend` (it imports Keras).
"""

import contextlib

import keras


def backend_tensors(arrays):
    """The NumPy gradients as the backend's tensors, on the device a step's
    gradients are on; made once and shared by the optimizers stepped."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        device = "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"
        with tf.device(device):
            return [tf.identity(tf.constant(x)) for x in arrays]
    if backend == "jax":
        import jax

        # Copies that JAX owns: a buffer made from a NumPy array can alias
        # NumPy's memory.
        return [jax.numpy.array(x, copy=True) for x in arrays]
    return [keras.ops.convert_to_tensor(x) for x in arrays]


def keras_step(optimizer, variables, grads, mode, strategy=None, ahead=False):
    """`(run, size)` of one step of the built `optimizer` on `variables`
    with `grads` (from `backend_tensors`); `size()` counts the ops of the
    TF graph or the equations of the jaxpr (None on torch). `ahead`: trace
    (TF) or compile (JAX) now, so that the first `run()` only runs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_step(optimizer, variables, grads, mode, strategy, ahead)
    if backend == "jax":
        return _jax_step(optimizer, variables, grads, ahead)
    return _torch_step(optimizer, variables, grads, mode), None


def _tf_step(optimizer, variables, tf_grads, mode, strategy, ahead):
    import tensorflow as tf

    if strategy is None:
        # A closure, not default arguments: tf.function would trace those.
        def apply(grads):
            optimizer.apply(grads, variables)
            return optimizer.iterations

    else:

        def replica_step(grads):
            # Gradients made in the replica, as a tape's are (placed on its
            # device: the all-reduce needs to know where they live).
            grads = [tf.identity(g) for g in grads]
            optimizer.apply(grads, variables)
            return optimizer.iterations.value

        def apply(grads):
            return strategy.run(replica_step, args=(grads,))

    fn = tf.function(apply, jit_compile=mode.endswith("xla"))
    if ahead:
        fn.get_concrete_function(tf_grads)  # XLA compiles in the first call

    def run():
        fn(tf_grads).numpy()  # blocks until done

    def size():
        # Ops of the graph plus those of the functions in its library (cond
        # branches, the replica function under a strategy).
        graph_def = fn.get_concrete_function(tf_grads).graph.as_graph_def()
        return len(graph_def.node) + sum(
            len(f.node_def) for f in graph_def.library.function
        )

    return run, size


def _jax_step(optimizer, variables, jax_grads, ahead):
    import jax

    # Copies that JAX owns: XLA copies a donated buffer that aliases
    # NumPy's memory instead of reusing it (a step would hold a copy of the
    # state).
    state = {
        "train": [jax.numpy.array(v.value, copy=True) for v in variables],
        "opt": [jax.numpy.array(v.value, copy=True) for v in optimizer.variables],
    }
    fn = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))
    if ahead:
        fn = fn.lower(state["opt"], jax_grads, state["train"]).compile()

    def run():
        train, opt = fn(state["opt"], jax_grads, state["train"])
        state["train"], state["opt"] = train, opt
        jax.block_until_ready(train)

    def size():
        jaxpr = jax.make_jaxpr(optimizer.stateless_apply)(
            state["opt"], jax_grads, state["train"]
        )
        return _jaxpr_eqns(jaxpr.jaxpr)

    return run, size


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


def _torch_step(optimizer, variables, torch_grads, mode):
    import torch

    context = torch.no_grad if mode == "eager-nograd" else contextlib.nullcontext

    def run():
        with context():
            optimizer.apply(torch_grads, variables)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return run


def official_step(optimizer):
    """One `step()` of a torch optimizer whose parameters hold their grads."""
    import torch

    def run():
        with torch.no_grad():
            optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return run
