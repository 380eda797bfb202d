"""AdamP and SGDP for Keras 3 (Heo et al., ICLR 2021).

Adam and SGD-momentum that remove the radial component of the update for
scale-invariant weights (kernels followed by BatchNorm or LayerNorm), so the
weight norm stops growing and the effective step size stops shrinking.
"""

__version__ = "0.1.0"

try:
    import keras  # noqa: F401
except ImportError as error:
    # Keras 3 imports its backend on `import keras`; without one the error
    # comes from deep inside Keras ("No module named 'tensorflow'").
    raise ImportError(
        "keras_adamp needs Keras 3 with a backend installed, and importing "
        f"Keras failed: {error}. Install a backend, `pip install tensorflow` "
        "(or jax, or torch; the extras keras-adamp[tensorflow], [jax], [torch] "
        "do it), and pick it with KERAS_BACKEND=tensorflow|jax|torch."
    ) from error

from keras_adamp import callbacks  # noqa: E402
from keras_adamp import diagnostics  # noqa: E402
from keras_adamp import layouts  # noqa: E402
from keras_adamp import projection  # noqa: E402
from keras_adamp._spherical import normalized_kernel_axes  # noqa: E402
from keras_adamp._spherical import normalized_kernels  # noqa: E402
from keras_adamp.adamp import AdamP  # noqa: E402
from keras_adamp.adams import AdamS  # noqa: E402
from keras_adamp.adamsrt import AdamSRT  # noqa: E402
from keras_adamp.layouts import channel_axes_for  # noqa: E402
from keras_adamp.sgdmrt import SGDMRT  # noqa: E402
from keras_adamp.sgdp import SGDP  # noqa: E402

__all__ = [
    "AdamP",
    "AdamS",
    "AdamSRT",
    "SGDMRT",
    "SGDP",
    "channel_axes_for",
    "normalized_kernel_axes",
    "normalized_kernels",
    "callbacks",
    "diagnostics",
    "layouts",
    "projection",
    "__version__",
]
