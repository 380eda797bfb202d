"""The optimizers the benchmarks compare, by name, with their hyperparameters:
ours, each against the Keras optimizer it extends (same hyperparameters),
the official PyTorch code, and optimizers wrapped in `keras_adamp.Projected`.

Reading the names and pairs imports nothing (`--summary` runs without
Keras); the factories import Keras and keras_adamp, so call them after
`_common.select_backend`.
"""

LR_ADAM = 1e-3
WEIGHT_DECAY_ADAM = 1e-2
LR_SGD = 0.1
WEIGHT_DECAY_SGD = 1e-4
MOMENTUM = 0.9
# Lion takes a 3-10x smaller learning rate and a larger decay than AdamW.
LR_LION = 1e-4
WEIGHT_DECAY_LION = 1e-1

#: ours -> the Keras optimizer it is timed against (same hyperparameters).
BASES = {
    "AdamP": "AdamW",
    "SGDP": "SGD",
    "SGDP-plain": "SGD-plain",
    "AdamS": "Adam",
    "AdamSRT": "Adam",
    "SGDMRT": "SGD-plain",
}
#: `keras_adamp.Projected(inner)` -> inner; each also against `ALSO`'s.
WRAPPED = {
    "Projected(AdamW)": "AdamW",
    "Projected(SGD)": "SGD",
    "Projected(Lion)": "Lion",
}
ALSO = {"Projected(AdamW)": "AdamP"}
#: ours or a Keras base -> the official PyTorch code's counterpart.
OFFICIAL = {
    "AdamP": "adamp.AdamP",
    "AdamW": "torch.AdamW",
    "SGDP": "adamp.SGDP",
    "SGD": "torch.SGD",
    "SGDP-plain": "adamp.SGDP-plain",
    "SGD-plain": "torch.SGD-plain",
}
OFFICIAL_PAIRS = (
    ("adamp.AdamP", "torch.AdamW"),
    ("adamp.SGDP", "torch.SGD"),
    ("adamp.SGDP-plain", "torch.SGD-plain"),
)
KERAS = ("AdamW", "SGD", "SGD-plain", "Adam", "Lion")
KNOWN = (*BASES, *WRAPPED, *KERAS)


def _keras_adamp():
    import keras_adamp

    return keras_adamp


def has_projected():
    return hasattr(_keras_adamp(), "Projected")


def parse(text):
    """Names from a comma-separated list; "Projected" stands for every
    wrapped configuration."""
    names = []
    for name in (n.strip() for n in text.split(",")):
        names += list(WRAPPED) if name == "Projected" else [name] if name else []
    return names


def unknown(names):
    return [n for n in names if n not in KNOWN]


def selected(names, other=False):
    """The configurations to time, in order: each name with what it is
    compared with; wrapped ones dropped (with a message) while
    `keras_adamp.Projected` does not exist; with `other`, each of ours again
    from the other checkout, named "<name>@base"."""
    if not has_projected() and any(n in WRAPPED for n in names):
        skipped = [n for n in names if n in WRAPPED]
        print(f"skipped {skipped}: this keras_adamp has no Projected")
        names = [n for n in names if n not in WRAPPED]
    out = []
    for name in names:
        for n in (name, BASES.get(name), WRAPPED.get(name), ALSO.get(name)):
            if n and n not in out:
                out.append(n)
    if other:
        out += [n + "@base" for n in out if n in BASES]
    return out


def pairs(names):
    """(ours, compared with) name pairs of the ratios to report."""
    result = []
    for n in names:
        for base in (BASES.get(n), WRAPPED.get(n), ALSO.get(n)):
            if base in names:
                result.append((n, base))
        if n in BASES and n + "@base" in names:
            result += [(n, n + "@base"), (n + "@base", BASES[n])]
    return result


def ours(module, designated, delta=None):
    """name -> factory of one of the optimizers of keras_adamp `module`;
    `designated()` gives the spherical optimizers' variables; `delta`, if
    given, the projecting optimizers' cosine threshold."""
    test = {} if delta is None else {"delta": delta}
    return {
        "AdamP": lambda: module.AdamP(
            learning_rate=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM, **test
        ),
        "SGDP": lambda: module.SGDP(
            learning_rate=LR_SGD,
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
            **test,
        ),
        "SGDP-plain": lambda: module.SGDP(
            learning_rate=LR_SGD,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY_SGD,
            **test,
        ),
        "AdamS": lambda: module.AdamS(learning_rate=LR_ADAM, spherical=designated()),
        "AdamSRT": lambda: module.AdamSRT(
            learning_rate=LR_ADAM, spherical=designated()
        ),
        "SGDMRT": lambda: module.SGDMRT(
            learning_rate=LR_SGD,
            momentum=MOMENTUM,
            l2=WEIGHT_DECAY_SGD,
            spherical=designated(),
        ),
    }


def keras_factories():
    """name -> factory of one of Keras's optimizers."""
    import keras

    return {
        "AdamW": lambda: keras.optimizers.AdamW(
            learning_rate=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM, epsilon=1e-8
        ),
        "SGD": lambda: keras.optimizers.SGD(
            learning_rate=LR_SGD,
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=WEIGHT_DECAY_SGD,
        ),
        "SGD-plain": lambda: keras.optimizers.SGD(
            learning_rate=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY_SGD
        ),
        "Adam": lambda: keras.optimizers.Adam(learning_rate=LR_ADAM, epsilon=1e-8),
        "Lion": lambda: keras.optimizers.Lion(
            learning_rate=LR_LION, weight_decay=WEIGHT_DECAY_LION
        ),
    }


#: The cosine threshold `--all-pass` gives the projecting optimizers: every
#: kernel passes the test, as in a network whose kernels all feed a
#: normalization (the random gradients of `_variables.make_data` pass on few).
ALL_PASS = 1e9


def factory(name, designated, other=None, delta=None):
    """A factory of the named optimizer (from the keras_adamp module `other`
    for a name ending in "@base"); `delta`, if given, the cosine threshold of
    the projecting ones."""
    if name.endswith("@base"):
        return ours(other, designated, delta)[name[: -len("@base")]]
    if name in BASES:
        return ours(_keras_adamp(), designated, delta)[name]
    if name in WRAPPED:
        inner = keras_factories()[WRAPPED[name]]
        test = {} if delta is None else {"delta": delta}
        return lambda: _keras_adamp().Projected(inner(), **test)
    return keras_factories()[name]


def official(name, params):
    """The official PyTorch optimizer `name` (a value of `OFFICIAL`) on
    `params`, with the hyperparameters of its Keras counterpart."""
    import adamp
    import torch

    sgd = dict(lr=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY_SGD)
    return {
        "adamp.AdamP": lambda: adamp.AdamP(
            params, lr=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM
        ),
        "torch.AdamW": lambda: torch.optim.AdamW(
            params, lr=LR_ADAM, weight_decay=WEIGHT_DECAY_ADAM, eps=1e-8
        ),
        "adamp.SGDP": lambda: adamp.SGDP(params, nesterov=True, **sgd),
        "torch.SGD": lambda: torch.optim.SGD(params, nesterov=True, **sgd),
        "adamp.SGDP-plain": lambda: adamp.SGDP(params, **sgd),
        "torch.SGD-plain": lambda: torch.optim.SGD(params, **sgd),
    }[name]()
