"""The torch-native step of `Projected`.

On torch, Keras runs its built-in optimizers (Adam, AdamW, SGD, Lion, ...)
as classes that update the whole variable list with in-place
``torch._foreach_*`` ops and never call ``update_step``. `Projected` lets
the inner optimizer's own step run untouched and projects what it did to
each kernel; here that is done over all variables at once, in place, under
``torch.no_grad``:

* the weights about to be updated are copied into buffers kept from step
  to step (the projected variables' size: the weight before the step is
  needed after it; kept, because a fresh allocation of that size costs
  more than the copy, its pages mapped and zeroed anew each step);
* after the inner's step, the per-channel sums ``<g,w>, <g,g>, <w,w>,
  <w,d>`` (``d`` the inner's update) are taken in row blocks that stay in
  the cache, ``d`` formed block by block, never whole;
* the decisions of all variables are made together on device
  (``keras_adamp._torch``'s, no host sync);
* each variable's correction, ``w <- w - w_before * c`` with a
  per-channel ``c``, is one ``_foreach_addcmul_`` over all of them.

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
            return True
        ks = [k for k, _ in held]
        layouts = [layout for _, layout in held]
        before = _snapshot(wrapper, [variables[k] for k in ks], [values[k] for k in ks])
        g = [_torch._dense(grads[k], values[k]) for k in ks]
        rates = [wrapper._decay_rate(variables[k]) for k in ks]
        original(grads, variables, learning_rate)
        after = [variables[k].value for k in ks]
        sums = [
            _sums(
                layout, gk.view(layout.view), b.view(layout.view), a.view(layout.view)
            )
            for layout, gk, b, a in zip(layouts, g, before, after)
        ]
        del g
        coef, ratio, owners, sizes = _torch._decide(
            layouts, sums, wrapper.delta, wrapper.wd_ratio, wrapper.eps
        )
        if any(rates):
            # The inner decayed w by (1 - decay); projected weights get
            # (1 - decay * ratio): w * decay (1 - ratio) / (1 - decay) back.
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
    return True


def _snapshot(wrapper, variables, values):
    """Copies of `values`, in buffers kept from step to step: a fresh
    parameter-sized allocation each step would be mapped and its pages
    zeroed anew by the allocator (large blocks go back to the system)."""
    buffers = wrapper.__dict__.setdefault("_torch_snapshots", {})
    out = []
    for variable, value in zip(variables, values):
        key = wrapper._get_variable_index(variable)
        buffer = buffers.get(key)
        if (
            buffer is None
            or buffer.shape != value.shape
            or buffer.dtype != value.dtype
            or buffer.device != value.device
        ):
            buffer = buffers[key] = torch.empty_like(value)
        out.append(buffer)
    torch._foreach_copy_(out, values)
    return out


def _sums(layout, g, w, w_new):
    """The per-channel ``<g,w>, <g,g>, <w,w>, <w,d>`` with ``d = w_new - w``,
    tensors of ``layout.view``: a float32 `(4, num_channels)` tensor.

    On the CPU the two-axis views are taken in row blocks whose products
    (and ``d``) stay in the cache, so each operand is read from memory once;
    elsewhere as ``sum(a * b)`` over the view's reduce axes.
    """
    low = w.dtype in _torch._LOW_PRECISION
    blocked = (
        w.device.type == "cpu"
        and len(layout.view) == 2
        and layout.numel > _torch._BLOCK
        and not torch.compiler.is_compiling()
    )
    if not blocked:
        if low:
            g, w, w_new = g.float(), w.float(), w_new.float()
        d = w_new - w
        return torch.stack(
            [torch.sum(a * b, dim=layout.reduce_axes) for a, b in _pairs(g, w, d)]
        ).reshape(4, layout.num_channels)
    rows, cols = layout.view
    if layout.reduce_axes == (0,):
        return _sums_by_rows(rows, cols, g, w, w_new, low)
    step = max(1, _torch._BLOCK // cols)
    scratch = torch.empty(2, step * cols, dtype=torch.float32)
    total = torch.zeros(4, rows, dtype=torch.float32)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        d = scratch[0, : (stop - start) * cols].view(stop - start, cols)
        s = scratch[1, : (stop - start) * cols].view(stop - start, cols)
        gb, wb, nb = g[start:stop], w[start:stop], w_new[start:stop]
        if low:
            gb, wb, nb = gb.float(), wb.float(), nb.float()
        torch.sub(nb, wb, out=d)
        for k, (a, b) in enumerate(_pairs(gb, wb, d)):
            torch.mul(a, b, out=s)
            torch.sum(s, dim=1, out=total[k, start:stop])
    return total


# Rows per block of `_sums_by_rows` x channels: the block's operands, its
# `d` and the four accumulators stay in a core's L2 cache.
_ROWS_BLOCK = 1 << 15


def _sums_by_rows(rows, cols, g, w, w_new, low):
    """`_sums` of a `(rows, C)` view, summed over rows: each product is
    added into a block-sized accumulator (one op per pair and block, the
    product never written apart), and the accumulators are summed once."""
    step = max(1, _ROWS_BLOCK // cols)
    acc = torch.zeros(4, min(step, rows), cols, dtype=torch.float32)
    scratch = torch.empty(step * cols, dtype=torch.float32)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        d = scratch[: (stop - start) * cols].view(stop - start, cols)
        gb, wb, nb = g[start:stop], w[start:stop], w_new[start:stop]
        if low:
            gb, wb, nb = gb.float(), wb.float(), nb.float()
        torch.sub(nb, wb, out=d)
        part = acc[:, : stop - start]
        for k, (a, b) in enumerate(_pairs(gb, wb, d)):
            part[k].addcmul_(a, b)
    return acc.sum(dim=1)


def _pairs(g, w, d):
    return ((g, w), (g, g), (w, w), (w, d))
