"""kfac_jax_ext: natural-gradient preconditioners as optax transformations.

Public face only; see ``spec/api.md`` for the contract.
"""

from kfac_jax_ext.adaptive_transform import (AdaptiveHealth, AdaptiveState,
                                             quadratic_model_step)
from kfac_jax_ext.cpu_threads import (lapack_thread_limit, lapack_threads,
                                      limit_lapack_threads, restore_lapack_threads)
from kfac_jax_ext.curvature_products import fisher_vector_product
from kfac_jax_ext.kfac_transform import scale_by_kfac
from kfac_jax_ext.state import Health, KfacState, curvature_due
from kfac_jax_ext.layers import Layer, describe_layers, find_layers
from kfac_jax_ext.model_damping import units_of as damping_units_of
from kfac_jax_ext.losses import (sigmoid_cross_entropy, softmax_cross_entropy,
                                 squared_error)
from kfac_jax_ext.schedule import Due, due_at
from kfac_jax_ext.natural_gradient_transform import (NaturalGradientState,
                                           scale_by_natural_gradient)
from kfac_jax_ext.optimizers import (clip_by_kl, kfac, natural_gradient,
                                     tengrad, tkfac, two_level_kfac)
from kfac_jax_ext.statistics import CurvatureBatch, value_and_grad
from kfac_jax_ext.tengrad_transform import TengradState, scale_by_tengrad
from kfac_jax_ext.tkfac_transform import scale_by_tkfac
from kfac_jax_ext.train_step import make_train_step
from kfac_jax_ext.tridiagonal_family import TridiagonalState
from kfac_jax_ext.two_level_transform import (TwoLevelState,
                                              scale_by_two_level_kfac)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveHealth", "AdaptiveState", "fisher_vector_product",
    "quadratic_model_step", "TridiagonalState", "CurvatureBatch", "Due",
    "Health", "KfacState", "Layer", "NaturalGradientState",
    "natural_gradient", "scale_by_natural_gradient", "clip_by_kl", "make_train_step",
    "curvature_due", "describe_layers", "due_at", "find_layers", "kfac", "scale_by_kfac",
    "scale_by_tengrad", "scale_by_tkfac", "sigmoid_cross_entropy",
    "softmax_cross_entropy", "squared_error", "tengrad", "TengradState",
    "tkfac", "TwoLevelState", "scale_by_two_level_kfac", "two_level_kfac",
    "value_and_grad", "lapack_thread_limit", "lapack_threads",
    "limit_lapack_threads", "restore_lapack_threads", "damping_units_of",
]
