"""AdamP and SGDP for Keras 3 (Heo et al., ICLR 2021).

Adam and SGD-momentum that remove the radial component of the update for
scale-invariant weights (kernels followed by BatchNorm or LayerNorm), so the
weight norm stops growing and the effective step size stops shrinking.
"""

__version__ = "0.2.0"

try:
    import keras
except ImportError as error:
    # Keras 3 imports its backend on `import keras`; without one the error
    # comes from deep inside Keras ("No module named 'tensorflow'").
    raise ImportError(
        "keras_adamp needs Keras 3 with a backend installed, and importing "
        f"Keras failed: {error}. Install a backend, `pip install tensorflow` "
        "(or jax, or torch; the extras keras-adamp[tensorflow], [jax], [torch] "
        "do it), and pick it with KERAS_BACKEND=tensorflow|jax|torch."
    ) from error

from keras_adamp import callbacks
from keras_adamp import diagnostics
from keras_adamp import layouts
from keras_adamp import projection
from keras_adamp._spherical import normalized_kernel_axes
from keras_adamp._spherical import normalized_kernels
from keras_adamp.adamp import AdamP
from keras_adamp.adams import AdamS
from keras_adamp.adamsrt import AdamSRT
from keras_adamp.layouts import channel_axes_for
from keras_adamp.projected import Projected
from keras_adamp.sgdmrt import SGDMRT
from keras_adamp.sgdp import SGDP

__all__ = [
    "SGDMRT",
    "SGDP",
    "AdamP",
    "AdamS",
    "AdamSRT",
    "Projected",
    "__version__",
    "callbacks",
    "channel_axes_for",
    "diagnostics",
    "layouts",
    "normalized_kernel_axes",
    "normalized_kernels",
    "projection",
]

# The short names Keras users write for Keras's own optimizers ("adamw"), for
# ours: `keras.optimizers.get("adamp")`, `compile(optimizer="sgdp")`. None is
# a Keras name (the tests check), so no Keras object is shadowed.
for _cls in (AdamP, SGDP, AdamS, AdamSRT, SGDMRT):
    keras.saving.get_custom_objects().setdefault(_cls.__name__.lower(), _cls)
del _cls
