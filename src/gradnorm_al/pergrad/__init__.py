"""Per-sample gradient norms of any model: exact, batched; knows nothing of active learning.

``per_sample_grad_norms(model, inputs, loss_fn, norm)`` returns, for every sample n of ``inputs``,
the norm of d loss_fn(model(x_n))_n / d theta over the model's trainable parameters, with one
batched forward and one input-gradient backward per chunk (see :mod:`.engine`).
``per_sample_grad_norms_functional`` (torch.func) is the exact whole-model fallback and
``per_sample_grad_norms_loop`` the slow reference: one backward pass per sample.
"""

from .common import NORMS, first_output, reduce_squared_norms
from .engine import FallbackWarning, per_sample_grad_norms
from .functional import per_sample_grad_norms_functional
from .reference import per_sample_grad_norms_loop

__all__ = [
    "NORMS",
    "FallbackWarning",
    "first_output",
    "per_sample_grad_norms",
    "per_sample_grad_norms_functional",
    "per_sample_grad_norms_loop",
    "reduce_squared_norms",
]
