"""The torch-native step of AdamP, SGDP, AdamS, AdamSRT and SGDMRT.

On the torch backend Keras replaces its own optimizers by classes that update
the whole variable list with in-place ``torch._foreach_*`` ops. A subclass of
``keras.optimizers.Optimizer`` gets the generic path instead: one eager torch
op, and one new tensor, per ``keras.ops`` call per variable. This module is
our optimizers' counterpart of Keras's: `update` runs one step of the five
optimizers on the variables' torch tensors, in place, under ``torch.no_grad``,
with the same math as their ``update_step`` (ALGORITHM.md):

* the elementwise work is done by ``torch._foreach_*`` ops over all variables
  at once, in place where the result is a slot or a variable;
* the per-channel sums a variable's projection or transport needs are taken
  without full-size temporaries on the CPU (row blocks that stay in cache);
* AdamP and SGDP decide the projections of all variables together, on device
  (``torch.where``, no Python branch on a tensor value, no host sync): the
  sums of every variable are laid side by side and the decision is a few
  small ops, then each variable's final assignment is one or two in-place
  ops with per-channel factors;
* the spherical optimizers get their transport from the sums of the weight
  and the moment before the step (``<w, w_new> = <w, w> - k <w, m>`` ...), so
  that ``w_new`` is never formed apart from the variable itself.

`update` returns False, and the caller runs the generic path, where writing
in place would be wrong: inside a ``keras.StatelessScope`` (``stateless_apply``:
no variable may change, and the tensors the caller mapped the variables to,
often their own ``.value``, must stay as they are), and where
``variable.value`` is another tensor than the variable's own parameter (an
autocast scope). An optimizer names its step here by its ``_torch_step`` (a
key of `STEPS`); a subclass that redefines the step (``update_step`` or one
of its hooks) gets the generic path.
"""

import math

import keras
import torch

#: Set to False to run the generic ``keras.ops`` path on torch (tests compare
#: the two).
ENABLED = True

# Elements per row block of the CPU channel sums: the block's products stay
# in the cache, so each sum reads its operands from memory once and writes
# no full-size product.
_BLOCK = 1 << 17

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def update(optimizer, grads, variables, learning_rate):
    """One step of `optimizer` on `variables`, in place.

    Called by the optimizers' ``_backend_update_step`` on the torch backend.

    Returns:
        False (nothing done) where the generic path must run instead.
    """
    if not ENABLED:
        return False
    step = _step_function(optimizer)
    if step is None or in_stateless_scope():
        return False
    values = [v.value for v in variables]
    if not all(_is_storage(x) for x in values):
        return False
    indices = [optimizer._get_variable_index(v) for v in variables]
    with torch.no_grad():
        grads = [_dense(g, w) for g, w in zip(grads, values)]
        # Variables with no elements have nothing to update (and no channel
        # to take a sum over).
        keep = [i for i, w in enumerate(values) if w.numel() > 0]
        if len(keep) != len(values):
            grads = [grads[i] for i in keep]
            values = [values[i] for i in keep]
            variables = [variables[i] for i in keep]
            indices = [indices[i] for i in keep]
        if not values:
            return True
        lr = _scalar(learning_rate, values[0].device)
        return step(optimizer, grads, values, variables, indices, lr)


def _step_function(optimizer):
    """The step `optimizer` names (`STEPS`), or None where it names none or
    its class redefines the step (`StepOptimizer._torch_step_name`)."""
    return STEPS.get(optimizer._torch_step_name())


def in_stateless_scope():
    """Whether a ``keras.StatelessScope`` is active.

    There, no variable may change: ``variable.value`` is the tensor the scope
    maps the variable to, which may well be the variable's own parameter (a
    caller of ``stateless_apply`` passing ``[v.value for v in ...]``), so no
    test on the tensor can tell. Keras has no public query for the scope; a
    scope entered records the one it nests in (``original_scope``).
    """
    probe = keras.StatelessScope(initialize_variables=False)
    with probe:
        pass
    return probe.original_scope is not None


def _is_storage(x):
    """Whether `x`, a ``variable.value`` read outside a StatelessScope, is
    the variable's own storage: Keras's torch variables hold a
    `torch.nn.Parameter`; in an autocast scope ``variable.value`` is a cast
    copy, which writing into would not update the variable."""
    return isinstance(x, torch.nn.Parameter) and x.is_contiguous()


def _dense(gradient, value):
    """The gradient as a dense tensor of the variable's dtype and device
    (sparse gradients are densified, as the generic path's `_dense` does:
    the cosine needs the whole gradient)."""
    if not isinstance(gradient, torch.Tensor):
        gradient = keras.ops.convert_to_tensor(gradient)
    if gradient.layout != torch.strided:
        gradient = gradient.to_dense()
    if gradient.dtype != value.dtype or gradient.device != value.device:
        gradient = gradient.to(device=value.device, dtype=value.dtype)
    # Viewed in the layout's shape (a transposed array's tensor is not).
    return gradient.contiguous()


def _scalar(x, device):
    """A float32 0-dim tensor of `x` (a Keras variable, tensor or number)."""
    if not isinstance(x, torch.Tensor):
        x = keras.ops.convert_to_tensor(x)
    return x.to(device=device, dtype=torch.float32)


def _step_count(optimizer, device):
    """t = iterations + 1, as a float32 0-dim tensor."""
    return _scalar(optimizer.iterations, device) + 1.0


def _one_minus_power(beta, t):
    """1 - beta**t in float32, as the generic path (`-expm1(t log beta)`)."""
    if beta == 0:
        return torch.ones_like(t)
    return -torch.expm1(t * math.log(beta))


def _views(values, layouts):
    return [x.view(layout.view) for x, layout in zip(values, layouts)]


def _per_channel(c, layout):
    """A `(num_channels,)` tensor shaped to broadcast against layout.view."""
    return c.view(layout.channel_view)


# -- per-channel sums -----------------------------------------------------


def _sums(layout, pairs):
    """The per-channel sums of ``a * b`` for each pair of tensors of
    ``layout.view``: a float32 `(len(pairs), num_channels)` tensor (see
    `_channel_sums`)."""
    tensors, index = [], {}
    for pair in pairs:
        for x in pair:
            if id(x) not in index:
                index[id(x)] = len(tensors)
                tensors.append(x)
    at = [(index[id(a)], index[id(b)]) for a, b in pairs]

    def products(blocks, scratch):
        return [(blocks[i], blocks[j]) for i, j in at]

    return _channel_sums(layout, tensors, products, len(pairs))


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
    low = tensors[0].dtype in _LOW_PRECISION
    blocked = (
        tensors[0].device.type == "cpu"
        and len(layout.view) == 2
        and layout.numel > _BLOCK
        and not torch.compiler.is_compiling()
    )
    rows_blocked = blocked and layout.reduce_axes == (0,)
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
    if rows_blocked:  # a kernel's (rows, C); the whole tensor's (numel, 1)
        return _sums_by_rows(rows, cols, tensors, products, count, low, copy)
    # Each row a channel (an Embedding's `(C, dim)`).
    step = max(1, _BLOCK // cols)
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


# -- the projection's decision (AdamP, SGDP) --------------------------------


def _cached(make, *key):
    """`make(*key)`, kept for the next steps. (Not functools.lru_cache:
    torch.compile traces through it with a warning.)"""
    entry = _CACHE.get((make, *key))
    if entry is None:
        if len(_CACHE) > 512:
            _CACHE.clear()
        entry = _CACHE[(make, *key)] = make(*key)
    return entry


_CACHE = {}


def _decision_constants(layouts, delta, device):
    """Per channel column (of all variables' channels side by side) the
    index of its variable and its threshold ``delta / sqrt(group size)``,
    then per variable ``delta / sqrt(numel)``; each variable's channels'
    end in the running count of channels."""
    owners, thresholds, ends = [], [], [0]
    for v, layout in enumerate(layouts):
        owners.extend([v] * layout.num_channels)
        thresholds.extend([delta / math.sqrt(layout.group_size)] * layout.num_channels)
        ends.append(ends[-1] + layout.num_channels)
    thresholds.extend(delta / math.sqrt(layout.numel) for layout in layouts)
    return (
        torch.tensor(owners, dtype=torch.long, device=device),
        torch.tensor(thresholds, dtype=torch.float32, device=device),
        torch.tensor(ends, dtype=torch.long, device=device),
        tuple(layout.num_channels for layout in layouts),
    )


def _decide(layouts, sums, delta, wd_ratio, eps):
    """The projections of several variables, decided together.

    Args:
        layouts: Per variable, its ChannelLayout.
        sums: Per variable, its float32 `(4, C)` per-channel
            ``<g,w>, <g,g>, <w,w>, <w,u>``.

    Returns:
        ``(coef, ratio)``: per channel of all variables (side by side)
        ``<w,u> / (||w|| + eps)^2`` of the view that passed the test (0
        where none did), float32 `(N,)`; per variable the weight decay's
        factor, `wd_ratio` if projected else 1, float32 `(V,)`.
    """
    owners, thresholds, ends, sizes = _cached(
        _decision_constants, tuple(layouts), delta, sums[0].device
    )
    channels = int(owners.shape[0])
    cols = _columns(sums)
    channel_wise, layer_wise, norm_w = _passing(cols, thresholds, ends, channels, eps)
    coef, ratio = _coefficients(
        cols[3], norm_w, channel_wise, layer_wise, owners, wd_ratio, eps
    )
    return coef, ratio, owners, sizes


def _columns(sums):
    """The per-variable `(k, C)` sums side by side, then one column per
    variable for its whole tensor (the sum of its channel sums)."""
    return torch.cat(sums + [s.sum(dim=1, keepdim=True) for s in sums], dim=1)


def _coefficients(wu, norm_w, channel_wise, layer_wise, owners, wd_ratio, eps):
    """`_decide`'s result from its test: per channel of all variables
    ``<w,u> / (||w|| + eps)^2`` of the view that passed (0 where none did),
    per variable the decay's factor (`wd_ratio` if projected, else 1).
    `wu` and `norm_w` are per column, as `_columns` lays them out."""
    channels = int(owners.shape[0])
    coefs = wu / torch.square(norm_w + eps)
    # coef = channel coef if channel_wise else (layer coef if layer_wise else 0)
    layer = torch.where(
        torch.logical_and(layer_wise, torch.logical_not(channel_wise)),
        coefs[channels:],
        torch.zeros_like(coefs[channels:]),
    )
    coef = torch.where(channel_wise[owners], coefs[:channels], layer[owners])
    # ratio = wd_ratio if projected else 1
    ratio = torch.where(
        torch.logical_or(channel_wise, layer_wise),
        torch.full_like(layer, wd_ratio),
        torch.ones_like(layer),
    )
    return coef, ratio


def _passing(cols, thresholds, ends, channels, eps):
    """Which views pass the cosine test, from the columns of
    ``<g,w>, <g,g>, <w,w>`` (rows 0-2 of `cols`: every variable's channels,
    then one column per variable for its whole tensor).

    Returns:
        ``(channel_wise, layer_wise, norm_w)``: per variable, whether every
        channel passes, whether the whole tensor does (bool `(V,)`); per
        column ``||w||``.
    """
    norm_w = torch.sqrt(cols[2])
    # |cos(g, w)|, each norm clamped below at eps (torch's cosine_similarity)
    cos = cols[0].abs() / (torch.sqrt(cols[1]).clamp_min(eps) * norm_w.clamp_min(eps))
    passes = cos < thresholds
    # channel_wise: no channel of the variable fails (differences of a
    # running count of failing channels, exact in int64).
    fails = torch.cumsum(torch.logical_not(passes[:channels]).long(), 0)
    fails = torch.cat([fails.new_zeros(1), fails])
    channel_wise = fails[ends[1:]] == fails[ends[:-1]]
    return channel_wise, passes[channels:], norm_w


def _decay_rates(optimizer, variables, rate):
    """Per variable, `rate` (a 0-dim tensor) where it is decayed, else 0:
    float32 `(V,)`. Read at each step, as the generic path does."""
    mask = [optimizer._decays(v) for v in variables]
    if not any(mask):
        return None
    return rate * torch.tensor(mask, dtype=torch.float32, device=rate.device)


def _split(x, sizes):
    return torch.split(x, list(sizes))


# -- AdamP ------------------------------------------------------------------


def _denominators(v, sqrt_bc2, eps):
    """Adam's denominators, ``sqrt(v) / sqrt_bc2 + eps`` (new tensors)."""
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, sqrt_bc2)
    torch._foreach_add_(denom, eps)
    return denom


def _adam_descend(w, numerators, denom, step):
    """w <- w - step * numerator / denom (the step size, a 0-dim tensor,
    multiplies each quotient, so a rate of 0 leaves w as it is)."""
    if torch.compiler.is_compiling():
        # torch.compile can't trace addcdiv with tensor scalars; it fuses
        # these two into one loop anyway.
        steps = torch._foreach_div(numerators, denom)
        torch._foreach_addcmul_(w, steps, [-step] * len(w))
        return
    torch._foreach_addcdiv_(w, numerators, denom, (-step).repeat(len(w)))


def _adamp(opt, grads, values, variables, indices, lr):
    b1, b2, eps = opt.beta_1, opt.beta_2, opt.epsilon
    device = values[0].device
    t = _step_count(opt, device)
    step = lr / _one_minus_power(b1, t)
    sqrt_bc2 = torch.sqrt(_one_minus_power(b2, t))
    m = [opt._momentums[i].value for i in indices]
    v = [opt._velocities[i].value for i in indices]
    if not all(_is_storage(x) for x in m + v):
        return False
    torch._foreach_lerp_(m, grads, 1.0 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
    plan = opt._plan.layouts
    rate = lr * opt.weight_decay
    plain = [k for k, i in enumerate(indices) if plan[i] is None]
    projected = [k for k, i in enumerate(indices) if plan[i] is not None]

    def part(ks):
        """Adam's numerators and denominators of the variables `ks`."""
        denom = _denominators([v[k] for k in ks], sqrt_bc2, eps)
        if opt.nesterov:  # (b1 * m + (1 - b1) * g) / denom
            numerators = torch._foreach_lerp(
                [m[k] for k in ks], [grads[k] for k in ks], 1.0 - b1
            )
        else:
            numerators = [m[k] for k in ks]
        return numerators, denom

    if plain:  # AdamW
        decayed = [values[k] for k in plain if opt._decays(variables[k])]
        if decayed:
            torch._foreach_mul_(decayed, 1.0 - rate)
        numerators, denom = part(plain)
        _adam_descend([values[k] for k in plain], numerators, denom, step)
        del numerators, denom
    if not projected:
        return True
    numerators, denom = part(projected)
    updates = torch._foreach_div(numerators, denom)
    del numerators, denom
    _finish_projected(
        opt,
        [plan[indices[k]] for k in projected],
        [values[k] for k in projected],
        [grads[k] for k in projected],
        updates,
        [variables[k] for k in projected],
        rate,
        step,
    )
    return True


def _finish_projected(opt, layouts, w, g, u, variables, rate, step):
    """``w <- w * (1 - rate * ratio) - step * (u - w * coef)`` for AdamP's
    update `u`, with the projection decided for all variables at once."""
    wv, gv, uv = _views(w, layouts), _views(g, layouts), _views(u, layouts)
    sums = [
        _sums(layout, [(a, b), (a, a), (b, b), (b, c)])
        for layout, a, b, c in zip(layouts, gv, wv, uv)
    ]
    coef, ratio, owners, sizes = _decide(
        layouts, sums, opt.delta, opt.wd_ratio, opt.epsilon
    )
    rates = _decay_rates(opt, variables, rate)
    # Folded: w * (1 - rate * ratio + step * coef) - step * u.
    scale = 1.0 + step * coef
    if rates is not None:
        scale = scale - (rates * ratio)[owners]
    scales = _split(scale, sizes)
    full, low = [], []
    for k, x in enumerate(w):
        (low if x.dtype in _LOW_PRECISION else full).append(k)
    if full:
        torch._foreach_mul_(
            [wv[k] for k in full],
            [_per_channel(scales[k], layouts[k]) for k in full],
        )
        torch._foreach_addcmul_(
            [w[k] for k in full], [u[k] for k in full], [-step] * len(full)
        )
    # 16-bit: 1 + coef would round away in 16 bits; the projected update is
    # formed in float32 and the variable rounded once, as the generic path.
    coefs = _split(coef, sizes)
    for k in low:
        layout = layouts[k]
        p = uv[k].float() - wv[k].float() * _per_channel(coefs[k], layout)
        if rates is not None:
            wv[k].mul_(1.0 - rates[k] * ratio[k])
        wv[k].sub_(step * p)


# -- SGDP -------------------------------------------------------------------


def _sgdp(opt, grads, values, variables, indices, lr):
    mom, damp = opt.momentum, opt.dampening
    plan = opt._plan.layouts
    if mom != 0:
        bufs = [opt._momentums[i].value for i in indices]
        if not all(_is_storage(x) for x in bufs):
            return False
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, grads, alpha=1.0 - damp)
    rate = lr * (opt.weight_decay / (1.0 - mom))
    neg_lr = -lr
    plain = [k for k, i in enumerate(indices) if plan[i] is None]
    projected = [k for k, i in enumerate(indices) if plan[i] is not None]

    def descend(ks, scale=1.0):
        """w <- w - lr * u, u the unprojected update."""
        w = [values[k] for k in ks]
        if mom == 0:
            torch._foreach_addcmul_(
                w, [grads[k] for k in ks], [neg_lr * (1 - damp)] * len(ks)
            )
            return
        b = [bufs[k] for k in ks]
        if opt.nesterov:  # u = g + momentum * buf
            torch._foreach_addcmul_(w, [grads[k] for k in ks], [neg_lr] * len(ks))
            torch._foreach_addcmul_(w, b, [neg_lr * mom] * len(ks))
        else:
            torch._foreach_addcmul_(w, b, [neg_lr] * len(ks))

    if plain:  # SGD with decoupled decay
        decayed = [values[k] for k in plain if opt._decays(variables[k])]
        if decayed:
            torch._foreach_mul_(decayed, 1.0 - rate)
        descend(plain)
    if not projected:
        return True

    layouts = [plan[indices[k]] for k in projected]
    w = [values[k] for k in projected]
    wv = _views(w, layouts)
    gv = _views([grads[k] for k in projected], layouts)
    sums = []
    for n, (layout, a, b) in enumerate(zip(layouts, gv, wv)):
        if mom == 0:  # u = (1 - dampening) * g: <w, u> = (1 - d) <g, w>
            s = _sums(layout, [(a, b), (a, a), (b, b)])
            s = torch.cat([s, s[:1] * (1.0 - damp)])
        else:
            c = bufs[projected[n]].view(layout.view)
            s = _sums(layout, [(a, b), (a, a), (b, b), (b, c)])
            if opt.nesterov:  # u = g + momentum * buf: <w, u> is linear
                s = torch.cat([s[:3], s[:1] + mom * s[3:]])
        sums.append(s)
    coef, ratio, owners, sizes = _decide(
        layouts, sums, opt.delta, opt.wd_ratio, opt.epsilon
    )
    variables_p = [variables[k] for k in projected]
    rates = _decay_rates(opt, variables_p, rate)
    coefs = _split(coef, sizes)
    if mom != 0 and not opt.nesterov:
        # The reference projects the buffer in place: the stored momentum is
        # the projected u, and the step is along it.
        bv = [bufs[k].view(layout.view) for k, layout in zip(projected, layouts)]
        torch._foreach_addcmul_(
            bv, wv, [_per_channel(-c, layout) for c, layout in zip(coefs, layouts)]
        )
        if rates is not None:
            factors = torch.unbind(1.0 - rates * ratio)
            decayed = [n for n, x in enumerate(variables_p) if opt._decays(x)]
            torch._foreach_mul_([w[n] for n in decayed], [factors[n] for n in decayed])
        torch._foreach_addcmul_(w, [bufs[k] for k in projected], [neg_lr] * len(w))
        return True
    # Folded: w * (1 - rate * ratio + lr * coef) - lr * u.
    scale = 1.0 + lr * coef
    if rates is not None:
        scale = scale - (rates * ratio)[owners]
    scales = _split(scale, sizes)
    full = [n for n, x in enumerate(w) if x.dtype not in _LOW_PRECISION]
    low = [n for n, x in enumerate(w) if x.dtype in _LOW_PRECISION]
    if full:
        torch._foreach_mul_(
            [wv[n] for n in full],
            [_per_channel(scales[n], layouts[n]) for n in full],
        )
        descend([projected[n] for n in full])
    for n in low:
        layout, k = layouts[n], projected[n]
        if mom == 0:
            u = grads[k].float() * (1.0 - damp)
        elif opt.nesterov:
            u = grads[k].float() + mom * bufs[k].float()
        u = u.view(layout.view) - wv[n].float() * _per_channel(coefs[n], layout)
        if rates is not None:
            wv[n].mul_(1.0 - rates[n] * ratio[n])
        wv[n].sub_(lr * u)
    return True


# -- AdamS, AdamSRT ---------------------------------------------------------


def _with_l2(opt, grads, values):
    """g = grad + l2 * w (a new list only if l2 is set)."""
    if not opt.l2:
        return grads
    return torch._foreach_add(grads, values, alpha=opt.l2)


def _sqrt_group_sizes(layouts, device):
    """sqrt(group size) per channel of all the layouts side by side."""
    return torch.tensor(
        [math.sqrt(x.group_size) for x in layouts for _ in range(x.num_channels)],
        dtype=torch.float32,
        device=device,
    )


def _adams(opt, grads, values, variables, indices, lr):
    transport = opt._rescale_and_transport
    b1, b2, eps = opt.beta_1, opt.beta_2, opt.epsilon
    device = values[0].device
    t = _step_count(opt, device)
    step = lr / _one_minus_power(b1, t)
    sqrt_bc2 = torch.sqrt(_one_minus_power(b2, t))
    m = [opt._momentums[i].value for i in indices]
    v = [opt._velocities[i].value for i in indices]
    if not all(_is_storage(x) for x in m + v):
        return False
    g = _with_l2(opt, grads, values)
    torch._foreach_lerp_(m, g, 1.0 - b1)
    plan = opt._plan.layouts
    plain = [k for k, i in enumerate(indices) if plan[i] is None]
    designated = [k for k, i in enumerate(indices) if plan[i] is not None]

    if plain:  # Adam with L2
        pv = [v[k] for k in plain]
        pg = [g[k] for k in plain]
        torch._foreach_mul_(pv, b2)
        torch._foreach_addcmul_(pv, pg, pg, value=1.0 - b2)
        denom = _denominators(pv, sqrt_bc2, eps)
        _adam_descend([values[k] for k in plain], [m[k] for k in plain], denom, step)
        del denom
    if not designated:
        return True

    layouts = [plan[indices[k]] for k in designated]
    moving = [transport and opt._plan.transports[indices[k]] for k in designated]
    wv = _views([values[k] for k in designated], layouts)
    mv = [m[k].view(layout.view) for k, layout in zip(designated, layouts)]
    gv = _views([g[k] for k in designated], layouts)
    # Per variable <g,g>, and for the transport <w,w>, <w,m>, <m,m>.
    sums = []
    for a, w_, m_, layout, moves in zip(gv, wv, mv, layouts, moving):
        pairs = [(a, a), (w_, w_), (w_, m_), (m_, m_)] if moves else [(a, a)]
        s = _sums(layout, pairs)
        if not moves:
            s = torch.cat([s, torch.zeros_like(s).expand(3, -1)])
        sums.append(s)
    sizes = [layout.num_channels for layout in layouts]
    gg, ww, wm, mm = torch.cat(sums, dim=1)
    vs = [v[k] for k in designated]
    v_new = b2 * torch.cat([x.float() for x in vs]) + (1.0 - b2) * gg
    denom = torch.sqrt(v_new) / sqrt_bc2 + eps
    # v sums the group's squares: sqrt(d) turns it back into a mean.
    k_step = step * _cached(_sqrt_group_sizes, tuple(layouts), device) / denom
    steps = _split(k_step, sizes)
    if any(moving):
        # From the sums before the step, with w_new = w - k m:
        n = ww - 2.0 * k_step * wm + k_step * k_step * mm
        w_wn = ww - k_step * wm
        m_wn = wm - k_step * mm
        alpha = w_wn / (n + eps)
        beta = m_wn / (n + eps)
        v_moved = v_new * ww / (n + eps)
        # m_new = alpha m - beta w = (alpha - beta k) m - beta w_new
        m_scale = _split(alpha - beta * k_step, sizes)
        m_shift = _split(-beta, sizes)
        v_new = torch.where(
            torch.cat(
                [
                    torch.full((size,), moves, dtype=torch.bool, device=device)
                    for size, moves in zip(sizes, moving)
                ]
            ),
            v_moved,
            v_new,
        )
    torch._foreach_addcmul_(
        wv, mv, [_per_channel(-s, layout) for s, layout in zip(steps, layouts)]
    )
    torch._foreach_copy_(vs, list(_split(v_new, sizes)))
    moved = [n for n, moves in enumerate(moving) if moves]
    if moved:
        torch._foreach_mul_(
            [mv[n] for n in moved],
            [_per_channel(m_scale[n], layouts[n]) for n in moved],
        )
        torch._foreach_addcmul_(
            [mv[n] for n in moved],
            [wv[n] for n in moved],
            [_per_channel(m_shift[n], layouts[n]) for n in moved],
        )
    return True


# -- SGDMRT -----------------------------------------------------------------


def _sgdmrt(opt, grads, values, variables, indices, lr):
    mom, damp, l2 = opt.momentum, opt.dampening, opt.l2
    neg_lr = -lr
    if mom == 0:
        # w - lr (1 - d) (grad + l2 w) = w (1 - lr (1 - d) l2) - lr (1 - d) grad
        if l2:
            torch._foreach_mul_(values, 1.0 - lr * ((1.0 - damp) * l2))
        torch._foreach_addcmul_(values, grads, [neg_lr * (1.0 - damp)] * len(values))
        return True
    bufs = [opt._momentums[i].value for i in indices]
    if not all(_is_storage(x) for x in bufs):
        return False
    torch._foreach_mul_(bufs, mom)
    torch._foreach_add_(bufs, grads, alpha=1.0 - damp)
    if l2:
        torch._foreach_add_(bufs, values, alpha=(1.0 - damp) * l2)
    plan = opt._plan
    moving = [k for k, i in enumerate(indices) if plan.transports[i]]
    sums = []
    layouts = [plan.layouts[indices[k]] for k in moving]
    wv = [values[k].view(layout.view) for k, layout in zip(moving, layouts)]
    bv = [bufs[k].view(layout.view) for k, layout in zip(moving, layouts)]
    for layout, w_, b_ in zip(layouts, wv, bv):
        sums.append(_sums(layout, [(w_, w_), (w_, b_), (b_, b_)]))
    torch._foreach_addcmul_(values, bufs, [neg_lr] * len(values))
    if not moving:
        return True
    sizes = [layout.num_channels for layout in layouts]
    ww, wb, bb = torch.cat(sums, dim=1)
    # From the sums before the step, with w_new = w - lr buf (no eps, as the
    # reference):
    n = ww - 2.0 * lr * wb + lr * lr * bb
    alpha = (ww - lr * wb) / n
    beta = (wb - lr * bb) / n
    # buf_new = alpha buf - beta w = (alpha - beta lr) buf - beta w_new
    scale = _split(alpha - beta * lr, sizes)
    shift = _split(-beta, sizes)
    torch._foreach_mul_(bv, [_per_channel(s, x) for s, x in zip(scale, layouts)])
    torch._foreach_addcmul_(
        bv, wv, [_per_channel(s, x) for s, x in zip(shift, layouts)]
    )
    return True


#: The steps, by the name an optimizer gives in its ``_torch_step``.
STEPS = {
    "adamp": _adamp,
    "sgdp": _sgdp,
    "adams": _adams,  # and AdamSRT (`_rescale_and_transport`)
    "sgdmrt": _sgdmrt,
}
