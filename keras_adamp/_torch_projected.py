"""The torch-native step of `Projected`.

On torch, Keras runs its built-in optimizers (Adam, AdamW, SGD, Lion, ...)
as classes that update the whole variable list with in-place
``torch._foreach_*`` ops and never call ``update_step``. `Projected` lets
the inner optimizer's own step run untouched and projects what it did to
each kernel, in place, under ``torch.no_grad``. The projection needs the
weight before the step after it (a copy, in buffers kept from step to step:
a fresh allocation of that size would have its pages mapped and zeroed anew
each step), the per-channel sums ``<g,w>, <g,g>, <w,w>, <w,d>`` (``d`` the
inner's update; taken in row blocks that stay in the cache) and, per
kernel, one correction ``w <- w - w_before * c`` with a per-channel ``c``.
Two orders:

* on the CPU (`_step_on_host`), each kernel is decided before the inner's
  step, from the sums that need no update; only the kernels that pass are
  copied and corrected, and where Keras's executor steps each variable
  alone, the inner runs one kernel at a time;
* elsewhere (`_step_on_device`), where reading a decision would wait for
  the device (or break a torch.compile graph), every kernel is copied and
  corrected (by 0 where no view passes), the decisions made together on
  the device.

`step` returns False (the caller runs the generic ``keras.ops`` path) inside
a ``keras.StatelessScope`` (no variable may change there, and the tensors the
scope maps them to may be their own storage) and where the variables' values
are not their own storage (an autocast scope).
"""

import torch

from keras_adamp import _torch

no_grad = torch.no_grad


def step(wrapper, original, grads, variables, learning_rate):
    """The inner optimizer's step (`original`) and the projection of its
    update, in place.

    Returns:
        False, having done nothing, where the generic path must run.
    """
    if not _torch.ENABLED or _torch.in_stateless_scope():
        return False
    values = [v.value for v in variables]
    if not all(_torch._is_storage(x) for x in values):
        return False
    held = []
    for k, (variable, value) in enumerate(zip(variables, values)):
        layout = wrapper._layout(variable)
        if layout is not None and value.numel() > 0:
            held.append((k, layout))
    with torch.no_grad():
        if not held:
            original(grads, variables, learning_rate)
        elif (
            HOST_DECISIONS
            and not torch.compiler.is_compiling()
            and all(values[k].device.type == "cpu" for k, _ in held)
        ):
            _step_on_host(
                wrapper, original, grads, variables, values, held, learning_rate
            )
        else:
            _step_on_device(
                wrapper, original, grads, variables, values, held, learning_rate
            )
    return True


#: Whether, on the CPU, the decisions are read on the host (see
#: `_step_on_host`); `_step_on_device` otherwise (tests set it to False to
#: run that path on the CPU).
HOST_DECISIONS = True

# Keras's torch executors (keras.src.backend.torch.optimizers) whose step
# updates each variable from its own slots alone, so that stepping the
# variables one at a time is the same step. Not Nadam: each call of its step
# advances the shared `_u_product`.
_PER_VARIABLE = frozenset(
    ("keras.src.backend.torch.optimizers.torch_" + module, name)
    for module, name in (
        ("adadelta", "Adadelta"),
        ("adagrad", "Adagrad"),
        ("adam", "Adam"),
        ("adamax", "Adamax"),
        ("adamw", "AdamW"),
        ("lion", "Lion"),
        ("rmsprop", "RMSprop"),
        ("sgd", "SGD"),
    )
)


def _per_variable(optimizer):
    cls = type(optimizer)
    return (cls.__module__, cls.__name__) in _PER_VARIABLE


def _step_on_host(wrapper, original, grads, variables, values, held, learning_rate):
    """The step where the decisions can be read at no cost (the CPU).

    The test needs only the gradient and the weight before the step, so
    each variable is decided before the inner's step, from the sums
    ``<g,w>, <g,g>, <w,w>`` taken in cache-sized blocks; only the weights
    that pass are kept (copied in the same blocks) and, after the inner's
    step, read again for ``<w,d>`` and corrected, ``w <- w - w_before * c``.
    A variable that passes no test is left as the inner leaves it.

    Whether a variable passes is known only once its sums are taken, so the
    copy is made in the blocks of the sums where the variable passed at the
    previous step (decisions change rarely), and apart where that guess was
    wrong.

    Where the inner's step updates each variable alone (`_PER_VARIABLE`),
    it runs on one kernel at a time, between its sums and its correction:
    one buffer of the largest kernel's size holds the copies, and the
    inner's temporaries are one variable's. Otherwise every kernel is
    decided first, the passing ones kept in buffers of their own, and the
    inner steps once.
    """
    state = wrapper.__dict__.setdefault("_torch_state", {})
    guesses = state.setdefault(("passed", wrapper.delta, wrapper.eps), {})
    one_by_one = _per_variable(wrapper.inner_optimizer)
    if one_by_one:
        chosen = {k for k, _ in held}
        rest = [k for k in range(len(variables)) if k not in chosen]
        if rest:
            original(
                [grads[k] for k in rest], [variables[k] for k in rest], learning_rate
            )
        largest = max(values[k].numel() for k, _ in held)

    def buffer(k, key):
        if one_by_one:
            return _buffer(state, values[k], reserve=largest)
        return _buffer(state, values[k], key=key)

    pending = []
    for k, layout in held:
        key = wrapper._get_variable_index(variables[k])
        copy = buffer(k, key) if guesses.get(key, True) else None
        sums = _torch._channel_sums(
            layout,
            (
                _torch._dense(grads[k], values[k]).view(layout.view),
                values[k].view(layout.view),
            ),
            _products_before,
            3,
            copy=None if copy is None else copy.view(layout.view),
        )
        guesses[key], decision = _test(layout, sums, wrapper.delta, wrapper.eps)
        if not guesses[key]:
            if one_by_one:
                original([grads[k]], [variables[k]], learning_rate)
            continue
        if copy is None:
            copy = buffer(k, key)
            copy.copy_(values[k])
        entry = (variables[k], layout, decision, copy)
        if one_by_one:
            original([grads[k]], [variables[k]], learning_rate)
            _correct(wrapper, *entry, learning_rate)
        else:
            pending.append(entry)
    if not one_by_one:
        original(grads, variables, learning_rate)
        for entry in pending:
            _correct(wrapper, *entry, learning_rate)


def _test(layout, sums, delta, eps):
    """`keras_adamp._torch`'s test of one variable from its `(3, C)`
    ``<g,w>, <g,g>, <w,w>``: ``(passed, decision)``, `passed` a Python bool
    (a view passes), `decision` what `_correct` needs of the test."""
    owners, thresholds, ends, _ = _torch._cached(
        _torch._decision_constants, (layout,), delta, sums.device
    )
    test = _torch._passing(
        _torch._columns([sums]), thresholds, ends, layout.num_channels, eps
    )
    channel_wise, layer_wise, _ = test
    return bool(channel_wise) or bool(layer_wise), (owners, test)


def _correct(wrapper, variable, layout, decision, w_before, learning_rate):
    """Corrects `variable` after the inner's step (`w_before` its value
    before it, `decision` the test of its sums then)."""
    w_before = w_before.view(layout.view)
    w_after = variable.value.view(layout.view)
    wd = _torch._channel_sums(layout, (w_before, w_after), _products_after, 1)
    owners, (channel_wise, layer_wise, norm_w) = decision
    coef, ratio = _torch._coefficients(
        _torch._columns([wd])[0],
        norm_w,
        channel_wise,
        layer_wise,
        owners,
        wrapper.wd_ratio,
        wrapper.eps,
    )
    (factor,) = _factors(
        [layout], (coef, ratio, owners), [wrapper._decay_rate(variable)], learning_rate
    )
    _apply([w_after], [w_before], [factor])


def _factors(layouts, decided, rates, learning_rate):
    """Per variable, the per-channel factor `c` of its correction ``w <- w -
    w_before * c``, from `_torch._decide`'s ``(coef, ratio, owners)`` and
    the rate of the decay the inner applied to it (0.0 for none): the radial
    part of its update where a view passes, and part of the decay given
    back."""
    coef, ratio, owners = decided
    if any(rates):
        # The inner decayed w by (1 - decay); projected weights get
        # (1 - decay * wd_ratio): w * decay (1 - wd_ratio) / (1 - decay) back.
        lr = _torch._scalar(learning_rate, coef.device)
        decay = lr * torch.tensor(rates, dtype=torch.float32, device=coef.device)
        coef = coef - (decay * (1.0 - ratio) / (1.0 - decay))[owners]
    sizes = [layout.num_channels for layout in layouts]
    return [
        _torch._per_channel(-c, layout)
        for c, layout in zip(torch.split(coef, sizes), layouts)
    ]


def _apply(after, before, factors):
    """``after <- after + before * factor`` per variable, in place (16-bit
    variables computed in float32)."""
    full = [n for n, a in enumerate(after) if a.dtype not in _torch._LOW_PRECISION]
    if full:
        torch._foreach_addcmul_(
            [after[n] for n in full],
            [before[n] for n in full],
            [factors[n] for n in full],
        )
    for a, b, factor in zip(after, before, factors):
        if a.dtype in _torch._LOW_PRECISION:
            a.copy_(a.float() + b.float() * factor)


def _products_before(blocks, scratch):
    g, w = blocks
    return ((g, w), (g, g), (w, w))


def _products_after(blocks, scratch):
    w, w_new = blocks
    d = w_new - w if scratch is None else torch.sub(w_new, w, out=scratch)
    return ((w, d),)


def _step_on_device(wrapper, original, grads, variables, values, held, learning_rate):
    """The step where reading a decision would wait for the device: every
    kernel is copied, the inner steps, and all are decided and corrected
    together, with no value read on the host (a projection that did not
    pass is a correction by 0)."""
    ks = [k for k, _ in held]
    layouts = [layout for _, layout in held]
    state = wrapper.__dict__.setdefault("_torch_state", {})
    before = [
        _buffer(state, values[k], key=wrapper._get_variable_index(variables[k]))
        for k in ks
    ]
    torch._foreach_copy_(before, [values[k] for k in ks])
    g = [_torch._dense(grads[k], values[k]) for k in ks]
    rates = [wrapper._decay_rate(variables[k]) for k in ks]
    original(grads, variables, learning_rate)
    after = [variables[k].value for k in ks]
    sums = [
        _torch._channel_sums(
            layout,
            (gk.view(layout.view), b.view(layout.view), a.view(layout.view)),
            _products_all,
            4,
        )
        for layout, gk, b, a in zip(layouts, g, before, after)
    ]
    del g
    coef, ratio, owners, _ = _torch._decide(
        layouts, sums, wrapper.delta, wrapper.wd_ratio, wrapper.eps
    )
    factors = _factors(layouts, (coef, ratio, owners), rates, learning_rate)
    _apply(
        [a.view(layout.view) for a, layout in zip(after, layouts)],
        [b.view(layout.view) for b, layout in zip(before, layouts)],
        factors,
    )


def _products_all(blocks, scratch):
    g, w, w_new = blocks
    return _products_before((g, w), scratch) + _products_after((w, w_new), scratch)


def _buffer(state, value, key=None, reserve=0):
    """A buffer of the value's shape, kept from step to step in `state` (a
    fresh allocation of that size each step would be mapped and its pages
    zeroed anew by the allocator): the one of `key`, or without a key a
    view of one flat buffer per dtype and device, grown to the largest
    value asked (or `reserve` elements)."""
    if key is None:
        shared = ("shared", value.dtype, value.device)
        flat = state.get(shared)
        if flat is None or flat.numel() < value.numel():
            flat = state[shared] = torch.empty(
                max(value.numel(), reserve), dtype=value.dtype, device=value.device
            )
        return flat[: value.numel()].view(value.shape)
    buffer = state.get(("own", key))
    if (
        buffer is None
        or buffer.shape != value.shape
        or buffer.dtype != value.dtype
        or buffer.device != value.device
    ):
        buffer = state[("own", key)] = torch.empty_like(value)
    return buffer
