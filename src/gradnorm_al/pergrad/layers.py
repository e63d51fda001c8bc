"""Per-sample squared gradient norms of a layer's parameters from its input and output gradient.

Each rule gets the layer's input ``a`` [N, ...] and the gradient of the summed loss w.r.t. its
output ``g`` [N, ...] (in eval mode sample n's gradient lives in row n only) and returns, per
trainable parameter name, float64 [N] squared norms of the per-sample parameter gradients.
Weight gradients are never formed for the whole batch; per sample they are either materialised
(one batched product) or avoided entirely with the Gram ("ghost norm") identity
``||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)``, whichever costs fewer flops for
the layer's shapes (as in mixed ghost clipping, Bu et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SquaredNorms = dict[str, torch.Tensor]
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], SquaredNorms]

_BLOCK = 4096  # float32 partial sums stay accurate over blocks this long

#: None: choose ghost norm or materialisation per layer by flops; "ghost" / "materialize": force
#: one where it applies (for tests and benchmarks)
FORCE_METHOD: str | None = None

#: below this many inputs per output (C_in x kernel area) im2col is cheap enough to materialise
#: per-sample weight gradients with a single batched product (a first layer on RGB or grey images)
SMALL_IM2COL = 32


def _use_ghost(ghost_cost: float, materialize_cost: float) -> bool:
    if FORCE_METHOD is not None:
        return FORCE_METHOD == "ghost"
    return ghost_cost < materialize_cost


def squared_norms(t: torch.Tensor) -> torch.Tensor:
    """float64 [N]: sum of squares of each row of ``t`` [N, ...], accurate for huge rows.

    float32 norms over millions of elements lose ~1e-5 relative; blocks of 4096 are reduced in the
    input dtype and the block results summed in float64.
    """
    t = t.reshape(t.shape[0], -1)
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, dim=1).square()
    n, m = t.shape
    k = m // _BLOCK
    total = torch.zeros(n, dtype=torch.float64, device=t.device)
    if k:
        blocks = torch.linalg.vector_norm(t[:, : k * _BLOCK].reshape(n, k, _BLOCK), dim=2)
        total += blocks.double().square().sum(dim=1)
    if m % _BLOCK:
        total += torch.linalg.vector_norm(t[:, k * _BLOCK :], dim=1).double().square()
    return total


def _gram_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_{t,s} (a_t . a_s)(g_t . g_s) per sample for a [N, T, p], g [N, T, q] -> float64 [N]."""
    n = a.shape[0]
    gram_a = torch.bmm(a, a.transpose(1, 2)).reshape(n, -1)
    gram_g = torch.bmm(g, g.transpose(1, 2)).reshape(n, -1)
    return torch.linalg.vecdot(gram_a, gram_g).double()


def _weight_and_bias(weight: torch.Tensor | None, bias: torch.Tensor | None) -> SquaredNorms:
    return {k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}


def _wants(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


# ---------------------------------------------------------------------------------------- Linear
def linear_rule(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])  # [N, T, in]: extra leading dims are summed over
    g = g.reshape(n, -1, g.shape[-1])  # [N, T, out]
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    weight = bias = None
    if _wants(module, "weight"):
        if t == 1:
            weight = squared_norms(a) * squared_norms(g)
        elif _use_ghost(t * t * (d_in + d_out), t * d_in * d_out):
            weight = _gram_sum(a, g)
        else:
            weight = squared_norms(torch.bmm(g.transpose(1, 2), a))
    if _wants(module, "bias"):
        bias = squared_norms(g.sum(dim=1))
    return _weight_and_bias(weight, bias)


# ---------------------------------------------------------------------------------- convolutions
def _conv_input(module: nn.modules.conv._ConvNd, a: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The input as the convolution sees it, and the (symmetric) padding still to apply: explicit
    padding for non-zero padding modes and for padding="same", which may be asymmetric."""
    spatial = a.dim() - 2
    if module.padding == "valid":
        return a, [0] * spatial
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(a, module._reversed_padding_repeated_twice, mode=mode), [0] * spatial
    return a, list(module.padding)


def _per_sample_conv_weight_grads(module, a, g, padding) -> torch.Tensor:
    """[N, *weight.shape] per-sample weight gradients by one convolution backward in which the
    batch is folded into the groups (sample n's channels form their own groups)."""
    n = a.shape[0]
    w = module.weight
    # only the weight's shape matters for the weight gradient: a zero-stride stand-in costs nothing
    fake_weight = w.new_zeros((), dtype=a.dtype).expand(n * w.shape[0], *w.shape[1:])
    output_padding = [0] * len(module.kernel_size)
    if module.transposed:  # derive it from the shapes: forward(x, output_size=...) may change it
        for i, (size_in, size_out) in enumerate(zip(a.shape[2:], g.shape[2:])):
            k, s, d = module.kernel_size[i], module.stride[i], module.dilation[i]
            output_padding[i] = size_out - ((size_in - 1) * s - 2 * padding[i] + d * (k - 1) + 1)
    grads = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]),
        a.reshape(1, -1, *a.shape[2:]),
        fake_weight,
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        module.transposed,
        output_padding,
        module.groups * n,
        [False, True, False],
    )[1]
    return grads.reshape(n, *w.shape)


def _shifted_window_sq_norms(a: torch.Tensor, g: torch.Tensor, module, padding) -> torch.Tensor:
    """float64 [N] squared norms of per-sample 2-D convolution weight gradients (groups=1) with no
    im2col: for every kernel offset (i, j) the gradient slice W[:, :, i, j] of sample n is
    g_n [C_out, L] @ window_ij(a_n) [L, C_in], where the window is a plain strided view of a
    channels-last copy of the padded input (rows flattened with the padded width, the extra
    columns killed by zero-padding g). Strides are handled by splitting the input into its
    stride x stride phases, each of which the offsets then address with stride 1."""
    n, c_in = a.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    ho, wo = g.shape[2:]
    padded = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    phases: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    g_wide: dict[int, torch.Tensor] = {}
    total = torch.zeros(n, dtype=torch.float64, device=a.device)
    for i in range(kh):
        qr, pr = divmod(i * dh, sh)
        for j in range(kw):
            qc, pc = divmod(j * dw, sw)
            if (pr, pc) not in phases:
                phase = padded[:, :, pr::sh, pc::sw]
                width = phase.shape[3]
                # one spare zero row lets the last window run past the end of its row
                flat = F.pad(phase, (0, 0, 0, 1)).permute(0, 2, 3, 1).contiguous()
                phases[(pr, pc)] = (flat.view(n, -1, c_in), width)
            flat, width = phases[(pr, pc)]
            if width not in g_wide:
                g_wide[width] = F.pad(g, (0, width - wo)).reshape(n, g.shape[1], ho * width)
            start = qr * width + qc
            window = flat[:, start : start + ho * width, :]
            total += squared_norms(torch.bmm(g_wide[width], window))
    return total


def conv_rule(module: nn.modules.conv._ConvNd, a: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    n = a.shape[0]
    a, padding = _conv_input(module, a)
    weight = bias = None
    if _wants(module, "weight"):
        spatial = len(module.kernel_size)
        planar = not module.transposed and module.groups == 1 and spatial <= 2
        conv, a2, g2, pad2 = module, a, g, padding
        if planar and spatial == 1:  # a 1-D convolution is a 2-D one of height 1
            conv, a2, g2, pad2 = _As2d(module), a.unsqueeze(2), g.unsqueeze(2), [0, *padding]
        c_out, length = g.shape[1], g[0, 0].numel()  # output channels, output positions L
        d = module.weight[0].numel()  # C_in / groups * prod(kernel)
        if planar:
            # the shifted windows run over the padded width: that many more positions
            wide = length * (a2.shape[-1] + 2 * pad2[-1]) / (conv.stride[-1] * g2.shape[-1])
            ghost = _use_ghost(length * length * (d + c_out), wide * d * c_out)
            if ghost or d <= SMALL_IM2COL:
                cols = F.unfold(
                    a2, conv.kernel_size, dilation=conv.dilation, padding=pad2, stride=conv.stride
                )  # [N, D, L]
                g_flat = g.reshape(n, c_out, -1)
                if ghost:
                    weight = _gram_sum(cols.transpose(1, 2), g_flat.transpose(1, 2))
                else:  # few input channels: im2col is cheap and one bmm per sample does it all
                    weight = squared_norms(torch.bmm(g_flat, cols.transpose(1, 2)))
            else:
                weight = _shifted_window_sq_norms(a2, g2, conv, pad2)
        else:
            weight = squared_norms(_per_sample_conv_weight_grads(module, a, g, padding))
    if _wants(module, "bias"):
        bias = squared_norms(g.flatten(2).sum(dim=2))
    return _weight_and_bias(weight, bias)


class _As2d:
    """The hyper-parameters of a Conv1d seen as a Conv2d of height 1 (only what the rules read)."""

    def __init__(self, module: nn.Conv1d) -> None:
        self.kernel_size = (1, *module.kernel_size)
        self.stride = (1, *module.stride)
        self.dilation = (1, *module.dilation)
        self.weight = module.weight


# -------------------------------------------------------------------------------- normalisation
def _affine_rule(module: nn.Module, x_hat: torch.Tensor, g: torch.Tensor, dims) -> SquaredNorms:
    """Per-element affine weight and bias: per-sample gradients are g * x_hat and g summed over
    ``dims`` (the positions sharing one weight); an empty ``dims`` means nothing to sum."""

    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=dims) if dims else t

    weight = squared_norms(total(g * x_hat)) if _wants(module, "weight") else None
    bias = squared_norms(total(g)) if _wants(module, "bias") else None
    return _weight_and_bias(weight, bias)


def batchnorm_rule(module: nn.modules.batchnorm._BatchNorm, a, g) -> SquaredNorms:
    """Eval-mode BatchNorm: per-sample, per-channel sums over positions of g * x_hat (weight) and
    g (bias), in one fused batch-norm backward with the batch folded into the channels."""
    n, c = a.shape[:2]
    folded = (1, n * c, *a.shape[2:]) if a.dim() > 2 else (1, n * c)
    weight = module.weight.detach().to(a.dtype).repeat(n) if module.weight is not None else None
    _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        g.reshape(folded),
        a.reshape(folded),
        weight,
        module.running_mean.to(a.dtype).repeat(n),
        module.running_var.to(a.dtype).repeat(n),
        None,
        None,
        False,
        module.eps,
        [False, True, True],
    )
    return _weight_and_bias(
        squared_norms(grad_w.view(n, c)) if _wants(module, "weight") else None,
        squared_norms(grad_b.view(n, c)) if _wants(module, "bias") else None,
    )


def layernorm_rule(module: nn.LayerNorm, a, g) -> SquaredNorms:
    k = len(module.normalized_shape)
    dims = tuple(range(a.dim() - k, a.dim()))
    mean = a.mean(dim=dims, keepdim=True)
    var = a.var(dim=dims, unbiased=False, keepdim=True)
    x_hat = (a - mean) * torch.rsqrt(var + module.eps)
    n = a.shape[0]
    flat = (n, -1, *module.normalized_shape)
    return _affine_rule(module, x_hat.reshape(flat), g.reshape(flat), (1,))


def groupnorm_rule(module: nn.GroupNorm, a, g) -> SquaredNorms:
    n, c = a.shape[:2]
    grouped = a.reshape(n, module.num_groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    var = grouped.var(dim=2, unbiased=False, keepdim=True)
    x_hat = ((grouped - mean) * torch.rsqrt(var + module.eps)).reshape(a.shape)
    return _affine_rule(module, x_hat, g, tuple(range(2, a.dim())))


# ------------------------------------------------------------------------------------ Embedding
def embedding_rule(module: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    """Rows hit by the same index in a sample add up: sum over equal-index pairs of g_t . g_s."""
    if not _wants(module, "weight"):
        return {}
    n = idx.shape[0]
    idx = idx.reshape(n, -1)
    g = g.reshape(n, idx.shape[1], -1)
    if module.padding_idx is not None:  # the padding row never receives a gradient
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)  # [N, T, T]
    return {"weight": (same * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2)).double()}


def rule_for(module: nn.Module) -> Rule | None:
    """The exact rule for ``module``, or None when it needs the generic fallback (an unsupported
    type, a subclass with its own forward, or BatchNorm that normalises with batch statistics)."""
    table: list[tuple[type, Rule]] = [
        (nn.Linear, linear_rule),
        (nn.modules.conv._ConvNd, conv_rule),
        (nn.modules.batchnorm._BatchNorm, batchnorm_rule),
        (nn.LayerNorm, layernorm_rule),
        (nn.GroupNorm, groupnorm_rule),
        (nn.Embedding, embedding_rule),
    ]
    for base, rule in table:
        if isinstance(module, base):
            own_forward = type(module).forward
            if base is nn.modules.conv._ConvNd:
                known = {
                    c.forward
                    for c in (
                        nn.Conv1d,
                        nn.Conv2d,
                        nn.Conv3d,
                        nn.ConvTranspose1d,
                        nn.ConvTranspose2d,
                        nn.ConvTranspose3d,
                    )
                }
                if own_forward not in known:
                    return None
            elif base is nn.modules.batchnorm._BatchNorm:
                if module.running_mean is None or own_forward not in {
                    nn.BatchNorm1d.forward,
                    nn.BatchNorm2d.forward,
                    nn.BatchNorm3d.forward,
                    nn.modules.batchnorm._BatchNorm.forward,
                }:
                    return None
            elif own_forward is not base.forward:
                return None
            return rule
    return None
