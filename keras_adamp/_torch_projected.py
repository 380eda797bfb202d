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
    lr = _torch._scalar(learning_rate, torch.device("cpu"))
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
        sums = _channel_sums(
            layout,
            (
                _torch._dense(grads[k], values[k]).view(layout.view),
                values[k].view(layout.view),
            ),
            _products_before,
            3,
            copy=None if copy is None else copy.view(layout.view),
        )
        channel_wise, layer_wise = _test(
            state, layout, sums, wrapper.delta, wrapper.eps
        )
        guesses[key] = channel_wise or layer_wise
        if not guesses[key]:
            if one_by_one:
                original([grads[k]], [variables[k]], learning_rate)
            continue
        if copy is None:
            copy = buffer(k, key)
            copy.copy_(values[k])
        entry = (variables[k], layout, sums[2], channel_wise, copy)
        if one_by_one:
            original([grads[k]], [variables[k]], learning_rate)
            _correct(wrapper, *entry, lr)
        else:
            pending.append(entry)
    if not one_by_one:
        original(grads, variables, learning_rate)
        for entry in pending:
            _correct(wrapper, *entry, lr)


def _test(state, layout, sums, delta, eps):
    """`keras_adamp._torch._passing`'s test of one variable, in the same
    float32 ops, from its `(3, C)` ``<g,w>, <g,g>, <w,w>``: whether every
    channel passes, whether the whole tensor does (Python bools)."""
    key = ("thresholds", layout, delta)
    thresholds = state.get(key)
    if thresholds is None:
        _, thresholds, _, _ = _torch._decision_constants((layout,), delta, sums.device)
        state[key] = thresholds
    cols = torch.cat([sums, sums.sum(dim=1, keepdim=True)], dim=1)
    cos = cols[0].abs() / (
        torch.sqrt(cols[1]).clamp_min(eps) * torch.sqrt(cols[2]).clamp_min(eps)
    )
    passes = cos < thresholds
    channels = layout.num_channels
    return bool(passes[:channels].all()), bool(passes[channels])


def _correct(wrapper, variable, layout, norms, channel_wise, w_before, lr):
    """Removes from `variable` the radial part of the inner's update, `w_before`
    its value before it, and gives back part of the inner's decay."""
    w_before = w_before.view(layout.view)
    w_after = variable.value.view(layout.view)
    coef = _coefficients(layout, norms, w_before, w_after, channel_wise, wrapper.eps)
    rate = wrapper._decay_rate(variable)
    if rate:
        # The inner decayed w by (1 - decay); projected weights get
        # (1 - decay * wd_ratio): w * decay (1 - wd_ratio) / (1 - decay) back.
        decay = lr * rate
        coef = coef - decay * (1.0 - wrapper.wd_ratio) / (1.0 - decay)
    factor = _torch._per_channel(-coef, layout)
    if w_after.dtype in _torch._LOW_PRECISION:
        w_after.copy_(w_after.float() + w_before.float() * factor)
    else:
        w_after.addcmul_(w_before, factor)


def _coefficients(layout, norms, w, w_new, channel_wise, eps):
    """Per channel ``<w,d> / (||w|| + eps)^2``, ``d = w_new - w``, of the
    view that passed (the channels, or the whole tensor for all of them);
    `norms` the channels' ``<w,w>``."""
    (wd,) = _channel_sums(layout, (w, w_new), _products_after, 1)
    if channel_wise:
        return wd / torch.square(torch.sqrt(norms) + eps)
    whole = wd.sum() / torch.square(torch.sqrt(norms.sum()) + eps)
    return whole.expand(layout.num_channels)


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
        _channel_sums(
            layout,
            (gk.view(layout.view), b.view(layout.view), a.view(layout.view)),
            _products_all,
            4,
        )
        for layout, gk, b, a in zip(layouts, g, before, after)
    ]
    del g
    coef, ratio, owners, sizes = _torch._decide(
        layouts, sums, wrapper.delta, wrapper.wd_ratio, wrapper.eps
    )
    if any(rates):
        # As in `_step_on_host`: part of the inner's decay given back.
        lr = _torch._scalar(learning_rate, coef.device)
        decay = lr * torch.tensor(rates, dtype=torch.float32, device=coef.device)
        coef = coef - (decay * (1.0 - ratio) / (1.0 - decay))[owners]
    factors = [
        _torch._per_channel(-c, layout)
        for c, layout in zip(torch.split(coef, list(sizes)), layouts)
    ]
    full = [n for n, a in enumerate(after) if a.dtype not in _torch._LOW_PRECISION]
    if full:
        torch._foreach_addcmul_(
            [after[n].view(layouts[n].view) for n in full],
            [before[n].view(layouts[n].view) for n in full],
            [factors[n] for n in full],
        )
    for n, a in enumerate(after):
        if a.dtype in _torch._LOW_PRECISION:
            view = layouts[n].view
            a.view(view).copy_(
                a.view(view).float() + before[n].view(view).float() * factors[n]
            )


def _products_all(blocks, scratch):
    g, w, w_new = blocks
    d = w_new - w if scratch is None else torch.sub(w_new, w, out=scratch)
    return ((g, w), (g, g), (w, w), (w, d))


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


def _channel_sums(layout, tensors, products, count, copy=None):
    """Per-channel sums of the `count` products that `products(blocks,
    scratch)` forms from `tensors` (of `layout.view`): a float32
    `(count, num_channels)` tensor (16-bit operands summed in float32).

    On the CPU the two-axis views are taken in row blocks that stay in the
    cache, each operand read from memory once (`scratch`, a block-sized
    float32 buffer, holds a block's difference where `products` forms one);
    elsewhere as ``sum(a * b)`` over the view's reduce axes.

    `copy`, if given, receives a copy of the last tensor (made block by
    block, where its blocks are read).
    """
    low = tensors[0].dtype in _torch._LOW_PRECISION
    blocked = (
        tensors[0].device.type == "cpu"
        and len(layout.view) == 2
        and layout.numel > _torch._BLOCK
        and not torch.compiler.is_compiling()
    )
    rows_blocked = blocked and layout.reduce_axes == (0,) and layout.view[1] > 1
    if copy is not None and not rows_blocked:
        copy.copy_(tensors[-1])
    if not blocked:
        if low:
            tensors = [t.float() for t in tensors]
        return torch.stack(
            [
                torch.sum(a * b, dim=layout.reduce_axes)
                for a, b in products(tensors, None)
            ]
        ).reshape(count, layout.num_channels)
    rows, cols = layout.view
    if layout.reduce_axes == (0,) and cols == 1:  # the whole tensor, one group
        return _sums_of_whole([t.reshape(-1) for t in tensors], products, count, low)
    if rows_blocked:
        return _sums_by_rows(rows, cols, tensors, products, count, low, copy)
    # Each row a channel (an Embedding's `(C, dim)`).
    step = max(1, _torch._BLOCK // cols)
    scratch = torch.empty(2, step * cols, dtype=torch.float32)
    total = torch.empty(count, rows, dtype=torch.float32)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        d = scratch[0, : (stop - start) * cols].view(stop - start, cols)
        s = scratch[1, : (stop - start) * cols].view(stop - start, cols)
        blocks = [t[start:stop] for t in tensors]
        if low:
            blocks = [b.float() for b in blocks]
        for k, (a, b) in enumerate(products(blocks, d)):
            torch.mul(a, b, out=s)
            torch.sum(s, dim=1, out=total[k, start:stop])
    return total


def _sums_of_whole(tensors, products, count, low):
    """`_channel_sums` of flat tensors, one group: dot products of blocks."""
    step = _torch._BLOCK
    scratch = torch.empty(step, dtype=torch.float32)
    total = torch.zeros(count, 1, dtype=torch.float32)
    size = tensors[0].numel()
    for start in range(0, size, step):
        stop = min(size, start + step)
        blocks = [t[start:stop] for t in tensors]
        if low:
            blocks = [b.float() for b in blocks]
        for k, (a, b) in enumerate(products(blocks, scratch[: stop - start])):
            total[k, 0] += torch.dot(a, b)
    return total


# Rows per block of `_sums_by_rows` x channels: the block's operands, its
# difference and the accumulators stay in a core's L2 cache.
_ROWS_BLOCK = 1 << 16


def _sums_by_rows(rows, cols, tensors, products, count, low, copy):
    """`_channel_sums` of `(rows, C)` views, summed over rows: each product
    is added into a block-sized accumulator (one op per product and block,
    the product never written apart), and the accumulators are summed
    once."""
    step = max(1, _ROWS_BLOCK // cols)
    acc = torch.zeros(count, min(step, rows), cols, dtype=torch.float32)
    scratch = torch.empty(step, cols, dtype=torch.float32)
    blocks = [t.split(step) for t in tensors]
    copies = copy.split(step) if copy is not None else None
    for n, block in enumerate(zip(*blocks)):
        if copies is not None:
            copies[n].copy_(block[-1])
        size = block[0].shape[0]
        if low:
            block = [b.float() for b in block]
        if size == step:
            part, d = acc, scratch
        else:
            part, d = acc[:, :size], scratch[:size]
        for k, (a, b) in enumerate(products(block, d)):
            part[k].addcmul_(a, b)
    return acc.sum(dim=1)
