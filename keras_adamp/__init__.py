"""AdamP and SGDP for Keras 3 (Heo et al., ICLR 2021).

Adam and SGD-momentum that remove the radial component of the update for
scale-invariant weights (kernels followed by BatchNorm or LayerNorm), so the
weight norm stops growing and the effective step size stops shrinking.
"""

from keras_adamp import projection
from keras_adamp import callbacks, diagnostics
from keras_adamp.adamp import AdamP
from keras_adamp.sgdp import SGDP

__version__ = "0.1.0"

__all__ = ["AdamP", "SGDP", "projection", "__version__"]
__all__ += ["callbacks", "diagnostics"]
