"""Per-sample squared gradient norms of a layer's parameters from its input and output gradient.

Each rule gets the layer's input ``a`` [N, ...] and the gradient of the summed loss w.r.t. its
output ``g`` [N, ...] (in eval mode sample n's gradient lives in row n only) and returns, per
trainable parameter name, float64 [N] squared norms of the per-sample parameter gradients.
Weight gradients are never formed for the whole batch; per sample they are either materialised
(one batched product) or avoided entirely with the Gram ("ghost norm") identity
``||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)``, whichever costs fewer flops for
the layer's shapes (as in mixed ghost clipping, Bu et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .composite import Composite, composite_for

SquaredNorms = dict[str, torch.Tensor]
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], SquaredNorms]

_BLOCK = 4096  # float32 partial sums stay accurate over blocks this long
_ONE_PASS = 16 * _BLOCK  # ... and within ~1e-6 over rows this long

#: None: choose per layer by estimated cost; "ghost" / "materialize" force the Gram identity or
#: the materialised per-sample gradient wherever either applies ("materialize": through shifted
#: windows for planar convolutions), "im2col" and "grouped" force those flavours of
#: materialisation for planar convolutions (for tests and benchmarks)
FORCE_METHOD: str | None = None

#: planar convolutions materialise per-sample weight gradients through an explicit im2col, in
#: blocks of samples, unless one sample's im2col is larger than this: then oneDNN's (or cuDNN's)
#: own weight-gradient kernel with the batch folded into the groups is faster (measured)
IM2COL_BYTES = 2 * 2**20

#: cost of one strided element-wise add relative to one multiply-add inside a matrix product
#: (measured on a 2-core AVX-512 CPU); weighs the offset sums of the padded-input ghost norm
STRIDED_ADD_COST = 32

#: 3-D convolutions with more output positions than this form per-sample weight gradients in
#: slabs of output depth planes of about this many positions, summed: oneDNN's weight-gradient
#: kernel slows down several-fold per position over long reductions (measured on the 2-core CPU,
#: 16 samples of 32^3: 16 -> 16 channels 3x3x3, 2.7 s in one call, 0.56 s in slabs of 4 planes;
#: 32 -> 32, 5.5 s and 0.84 s; no change on 16^3 and smaller maps, which are one slab)
SLAB_POSITIONS = 4096

#: the blocks of samples of a 3-D convolution's folded weight-gradient backward take up to this
#: much (a slab's input and output gradient and the weight gradient per sample): its cost per
#: call hardly grows with the samples in it (measured on the 2-core CPU, 32 -> 32 channels on
#: 32^3: 585 ms per sample in blocks of 1, 89 ms in blocks of 16; cnn3d's engine on 16 samples
#: 17-28 s with 4 MiB blocks, 10-13 s with 64 MiB). The chunk's own activations are larger:
#: one 32-channel map of one 32^3 sample alone takes 4 MiB
VOLUME_BLOCK_BYTES = 64 * 2**20

#: materialising rules take the samples of a chunk in blocks whose temporaries (im2col rows and
#: per-sample gradients) are about this large: memory stays bounded for large layers, and on a
#: 2-core CPU blocks of this size were as fast as one block for the whole chunk (measured)
BLOCK_BYTES = 4 * 2**20


def use_ghost(ghost_cost: float, materialize_cost: float) -> bool:
    """Whether a rule takes the Gram identity (ghost norm) rather than materialising per-sample
    gradients, from the two estimated costs (``FORCE_METHOD`` overrides); shared by every rule,
    the recurrent layers' included."""
    if FORCE_METHOD is not None:
        return FORCE_METHOD == "ghost"
    return ghost_cost < materialize_cost


def squared_norms(t: torch.Tensor) -> torch.Tensor:
    """float64 [N]: sum of squares of each row of ``t`` [N, ...], accurate for huge rows.

    float32 norms over millions of elements lose ~1e-5 relative; rows longer than
    ``_ONE_PASS`` are reduced in blocks of 4096 in the input dtype and the block results summed in
    float64 (shorter rows lose ~1e-6 at most, in one cheap call).
    """
    t = t.reshape(t.shape[0], -1)
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, dim=1).square()
    # float16 / bfloat16 values are reduced (and their norms returned) in float32: a norm rounded
    # to bfloat16 would lose ~0.2%
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if t.shape[1] <= _ONE_PASS:
        return torch.linalg.vector_norm(t, dim=1, dtype=acc).double().square()
    n, m = t.shape
    k = m // _BLOCK
    total = torch.zeros(n, dtype=torch.float64, device=t.device)
    if k:
        blocks = t[:, : k * _BLOCK].reshape(n, k, _BLOCK)
        total += torch.linalg.vector_norm(blocks, dim=2, dtype=acc).double().square().sum(dim=1)
    if m % _BLOCK:
        total += torch.linalg.vector_norm(t[:, k * _BLOCK :], dim=1, dtype=acc).double().square()
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
def linear_sq_norms(
    a: torch.Tensor, g: torch.Tensor, weight: bool = True, bias: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """float64 [N] squared norms of the per-sample weight and bias gradients (None where not
    asked) of a linear map y = a W^T + b from its input ``a`` [N, ..., in] and output gradient
    ``g`` [N, ..., out]; positions in the middle dimensions share W and b (their gradients add).
    The weight's are materialised or taken by the Gram identity, whichever costs fewer flops."""
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])  # [N, T, in]: extra leading dims are summed over
    g = g.reshape(n, -1, g.shape[-1])  # [N, T, out]
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    w_sq = b_sq = None
    if weight:
        if t == 1:
            w_sq = squared_norms(a) * squared_norms(g)
        elif use_ghost(t * t * (d_in + d_out), t * d_in * d_out):
            w_sq = _gram_sum(a, g)
        else:
            w_sq = squared_norms(torch.bmm(g.transpose(1, 2), a))
    if bias:
        b_sq = squared_norms(g.sum(dim=1))
    return w_sq, b_sq


def linear_rule(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    return _weight_and_bias(
        *linear_sq_norms(a, g, _wants(module, "weight"), _wants(module, "bias"))
    )


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
    batch is folded into the groups (sample n's channels form their own groups); for a 3-D
    convolution with more than SLAB_POSITIONS output positions, one such backward per slab of
    output depth planes, summed (see :func:`_depth_slabs`)."""
    if module.transposed or len(module.kernel_size) != 3 or g[0, 0].numel() <= SLAB_POSITIONS:
        return _folded_weight_grads(module, a, g, padding)
    total = None
    for a_slab, g_slab, slab_padding in _depth_slabs(module, a, g, padding):
        grads = _folded_weight_grads(module, a_slab, g_slab, slab_padding)
        total = grads if total is None else total.add_(grads)
    return total


def _depth_slabs(
    module, a: torch.Tensor, g: torch.Tensor, padding
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(input slab, output-gradient slab, padding) of a 3-D convolution, slabs of consecutive
    output depth planes with about SLAB_POSITIONS output positions each. The weight gradient is a
    sum over output positions, so it is the sum of the slabs' weight gradients; output planes
    [o0, o1) read the input planes [o0 s, (o1 - 1) s + d (k - 1) + 1) of the input zero-padded in
    depth (the padding left to the convolution is zeros: see :func:`_conv_input`)."""
    k, s, d = module.kernel_size[0], module.stride[0], module.dilation[0]
    a = F.pad(a, (0, 0, 0, 0, padding[0], padding[0]))
    planes = max(1, SLAB_POSITIONS // (g.shape[3] * g.shape[4]))
    rest = [0, *padding[1:]]
    for o0 in range(0, g.shape[2], planes):
        o1 = min(g.shape[2], o0 + planes)
        yield a[:, :, o0 * s : (o1 - 1) * s + d * (k - 1) + 1], g[:, :, o0:o1], rest


def _folded_weight_grads(module, a, g, padding) -> torch.Tensor:
    """[N, *weight.shape]: one convolution backward with the batch folded into the groups."""
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


def _phases(a: torch.Tensor, module, padding) -> list[tuple[torch.Tensor, int, list[int]]]:
    """The padded input of a 2-D convolution split into its stride x stride phases, in which every
    kernel offset addresses its inputs with stride 1.

    Per phase used by some offset: a channels-last copy flattened over positions [N, P, C_in] (one
    spare zero row lets the last window run past the end of its row), the phase's width, and the
    flat start of each of its offsets. Offset (i, j) of output position (r, c) reads flat position
    start + r * width + c: a plain strided window of ``ho * width`` rows ("wide" positions; the
    extra columns of each row are junk that a zero-padded output gradient cancels)."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    n, c = a.shape[:2]
    starts: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(kh):
        qr, pr = divmod(i * dh, sh)
        for j in range(kw):
            qc, pc = divmod(j * dw, sw)
            starts.setdefault((pr, pc), []).append((qr, qc))
    if sh == sw == 1:  # one phase: the padded input itself
        padded = _padded_channels_last(a, padding, spare_rows=1)
        width = padded.shape[2]
        return [(padded.view(n, -1, c), width, [qr * width + qc for qr, qc in starts[0, 0]])]
    padded = _padded_channels_last(a, padding)
    out = []
    for (pr, pc), offsets in starts.items():
        phase = padded[:, pr::sh, pc::sw]
        width = phase.shape[2]
        flat = phase.new_zeros(n, phase.shape[1] + 1, width, c)
        flat[:, :-1] = phase
        out.append((flat.view(n, -1, c), width, [qr * width + qc for qr, qc in offsets]))
    return out


def _padded_channels_last(a: torch.Tensor, padding, spare_rows: int = 0) -> torch.Tensor:
    """a [N, C, H, W] zero-padded by ``padding`` (plus ``spare_rows`` zero rows at the bottom) in
    one copy, channels last: [N, H + 2 p_h + spare_rows, W + 2 p_w, C]."""
    n, c, h, w = a.shape
    out = a.new_zeros(n, h + 2 * padding[0] + spare_rows, w + 2 * padding[1], c)
    out[:, padding[0] : padding[0] + h, padding[1] : padding[1] + w] = a.permute(0, 2, 3, 1)
    return out


def _sample_blocks(n: int, per_sample_bytes: int, budget: int | None = None) -> list[slice]:
    """Consecutive blocks of the chunk's samples whose temporaries take about ``budget`` bytes
    (default BLOCK_BYTES)."""
    budget = BLOCK_BYTES if budget is None else budget
    size = max(1, min(n, budget // max(1, per_sample_bytes)))
    return [slice(i, i + size) for i in range(0, n, size)]


def _wide(g: torch.Tensor, width: int) -> torch.Tensor:
    """g [N, C, ho, wo] zero-padded to ``width`` columns and flattened: [N, C, ho * width]."""
    return F.pad(g, (0, width - g.shape[3])).reshape(g.shape[0], g.shape[1], -1)


def _shifted_window_sq_norms(a: torch.Tensor, g: torch.Tensor, module, padding) -> torch.Tensor:
    """float64 [N] squared norms of per-sample 2-D convolution weight gradients (groups=1) with no
    im2col: for every kernel offset the gradient slice W[:, :, i, j] of sample n is
    g_n [C_out, L] @ window(a_n) [L, C_in], a window of :func:`_phases`."""
    n, ho = a.shape[0], g.shape[2]
    total = torch.zeros(n, dtype=torch.float64, device=a.device)
    wides: dict[int, torch.Tensor] = {}
    for flat, width, starts in _phases(a, module, padding):
        if width not in wides:
            wides[width] = _wide(g, width)
        for start in starts:
            window = flat[:, start : start + ho * width, :]
            total += squared_norms(torch.bmm(wides[width], window))
    return total


def _padded_gram_sq_norms(a: torch.Tensor, g: torch.Tensor, module, padding) -> torch.Tensor:
    """float64 [N] squared norms of per-sample 2-D convolution weight gradients (groups=1) by the
    ghost norm without im2col. With A_o the window of offset o and G the output gradient,
    ||sum_o ...||^2 = sum_o <A_o A_o^T, G^T G>, and every A_o A_o^T is a shifted diagonal block of
    the Gram matrix P of the padded input's positions: P costs (positions)^2 x C_in instead of
    (positions)^2 x C_in x kernel area, and the offsets only add up blocks of it. The blocks are
    taken over "wide" output rows (every column of the phase, so that an offset is a plain shift)
    and only their entries at real output positions meet G^T G."""
    n, c_out, ho, wo = g.shape
    g_flat = g.reshape(n, c_out, ho * wo)
    gram_g = torch.bmm(g_flat.transpose(1, 2), g_flat).view(n, ho, wo, ho, wo)
    total = torch.zeros(n, dtype=torch.float64, device=a.device)
    for flat, width, starts in _phases(a, module, padding):
        length = ho * width
        lo, hi = min(starts), max(starts) + length
        span = flat[:, lo:hi]
        p = torch.bmm(span, span.transpose(1, 2))
        blocks = None
        for start in starts:
            block = p[:, start - lo : start - lo + length, start - lo : start - lo + length]
            blocks = block.clone() if blocks is None else blocks.add_(block)
        real = blocks.view(n, ho, width, ho, width)[:, :, :wo, :, :wo]
        total += torch.mul(real, gram_g).view(n, -1).sum(dim=1).double()
    return total


def _padded_gram_cost(a: torch.Tensor, g: torch.Tensor, module, padding) -> float:
    """Multiply-adds per sample of :func:`_padded_gram_sq_norms`, strided adds weighted."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    c_in, c_out, ho, wo = a.shape[1], g.shape[1], g.shape[2], g.shape[3]
    rows, cols = a.shape[2] + 2 * padding[0], a.shape[3] + 2 * padding[1]
    phases = {((i * dh) % sh, (j * dw) % sw) for i in range(kh) for j in range(kw)}
    width = -(-cols // sw)
    wide = ho * width
    span = min(-(-rows // sh) + 1, ho + (kh - 1) * dh // sh + 1) * width
    return (
        len(phases) * span * span * c_in
        + (ho * wo) ** 2 * c_out
        + wide * wide * STRIDED_ADD_COST * kh * kw
    )


def _im2col_sq_norms(
    a: torch.Tensor, g: torch.Tensor, module, padding, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 [N] squared norms of per-sample 2-D convolution weight gradients (groups=1) with an
    explicit im2col built by one strided copy, and batched products g_n [C_out, L] @ cols_n.
    The copy runs along its longest contiguous axis: channels (channels-last) when there are more
    channels than output columns and the kernel has more than one tap (so that the channels-last
    copy of the input is small next to the im2col), output columns ([N, D, L]) otherwise.
    Channels last with stride 1 along the height, only the kernel's columns are unrolled (see
    :func:`_kernel_row_sq_norms`)."""
    n, c_in = a.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    ho, wo = g.shape[2:]
    g_flat = g.reshape(n, g.shape[1], -1)
    if c_in >= wo and kh * kw > 1:
        if sh == 1 and kh > 1:
            return _kernel_row_sq_norms(a, g_flat, module, padding, wo, scale)
        # blocks of samples bound the memory of the im2col rows and per-sample gradients
        per_sample = (ho * wo + g.shape[1]) * kh * kw * c_in * a.element_size()
        total = []
        for block in _sample_blocks(n, per_sample):
            padded = _padded_channels_last(a[block], padding)  # [B, H, W, C]
            s_n, s_h, s_w, s_c = padded.stride()
            cols = padded.as_strided(
                (padded.shape[0], ho, wo, kh, kw, c_in),
                (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, s_c),
            ).reshape(-1, ho * wo, kh * kw * c_in)
            grads = torch.bmm(g_flat[block], cols)  # [B, C_out, D]
            total.append(squared_norms(grads if scale is None else grads * scale.view(-1, 1)))
        return torch.cat(total)
    padded = F.pad(a, (padding[1], padding[1], padding[0], padding[0])).contiguous()
    s_n, s_c, s_h, s_w = padded.stride()
    cols = padded.as_strided(
        (n, c_in, kh, kw, ho, wo), (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w)
    ).reshape(n, c_in * kh * kw, ho * wo)
    grads = torch.bmm(cols, g_flat.transpose(1, 2))  # [N, D, C_out]: faster than g @ cols^T
    return squared_norms(grads if scale is None else grads * scale)


def _kernel_row_sq_norms(
    a: torch.Tensor, g_flat: torch.Tensor, module, padding, wo: int, scale=None
) -> torch.Tensor:
    """The channels-last im2col for stride 1 along the height, unrolling only the kernel's
    columns: rows[n, h * wo + w] = (input columns w * s_w + j * d_w, j < k_w, of padded row h,
    all channels). The im2col of kernel row i is then the block of ho * wo consecutive rows
    starting at row i * d_h * wo, a plain matrix: k_h products per sample read it in place, and
    the copy is k_h times smaller than a full im2col."""
    n, c_in = a.shape[:2]
    (kh, kw), (_, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    c_out, length = g_flat.shape[1:]
    hp = a.shape[2] + 2 * padding[0]
    per_sample = (hp * wo + kh * c_out) * kw * c_in * a.element_size()
    total = []
    for block in _sample_blocks(n, per_sample):
        padded = _padded_channels_last(a[block], padding)  # [B, Hp, Wp, C]
        b = padded.shape[0]
        s_n, s_h, s_w, s_c = padded.stride()
        rows = padded.as_strided((b, hp, wo, kw, c_in), (s_n, s_h, sw * s_w, dw * s_w, s_c))
        rows = rows.reshape(b, hp * wo, kw * c_in)
        grads = g_flat.new_empty(kh, b, c_out, kw * c_in)
        for i in range(kh):
            start = i * dh * wo
            torch.bmm(g_flat[block], rows[:, start : start + length], out=grads[i])
        if scale is not None:
            grads.mul_(scale.view(-1, 1))
        total.append(squared_norms(grads.view(kh * b, -1)).view(kh, b).sum(dim=0))
    return torch.cat(total)


def conv_rule(
    module: nn.modules.conv._ConvNd,
    a: torch.Tensor,
    g: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> SquaredNorms:
    """``scale`` [C_out], when given: the output gradient is ``g`` with output channel c
    multiplied by ``scale[c]`` (``g`` is then the output gradient of an eval-mode BatchNorm that
    alone reads this layer's output). The per-sample gradients are linear in each output
    channel's gradient, so the scale is applied to them, which are small, instead of to ``g``."""
    a, padding = _conv_input(module, a)
    weight = bias = None
    if _wants(module, "weight"):
        spatial = len(module.kernel_size)
        if not module.transposed and module.groups == 1 and spatial <= 2:
            conv, a2, g2, pad2 = module, a, g, padding
            if spatial == 1:  # a 1-D convolution is a 2-D one of height 1
                conv, a2, g2, pad2 = _As2d(module), a.unsqueeze(2), g.unsqueeze(2), [0, *padding]
            weight = _planar_conv_sq_norms(conv, a2, g2, pad2, scale)
        elif spatial == 3 and not module.transposed:  # slabs, blocks of samples
            weight = _grouped_sq_norms(module, a, g, padding, scale)
        else:
            grads = _per_sample_conv_weight_grads(module, a, g, padding)
            weight = squared_norms(grads if scale is None else _scale_out(grads, module, scale))
    if _wants(module, "bias"):
        sums = g.flatten(2).sum(dim=2)
        bias = squared_norms(sums if scale is None else sums * scale)
    return _weight_and_bias(weight, bias)


def _scale_out(grads: torch.Tensor, module, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients [N, *weight.shape] with output channel c times scale[c]
    (a transposed convolution's weight is [C_in, C_out / groups, ...])."""
    n, shape = grads.shape[0], module.weight.shape
    if not module.transposed:
        return grads * scale.view(1, -1, *[1] * (grads.dim() - 2))
    groups = module.groups
    per_group = grads.view(n, groups, shape[0] // groups, shape[1], *shape[2:])
    factor = scale.view(1, groups, 1, shape[1], *[1] * (len(shape) - 2))
    return (per_group * factor).view(grads.shape)


def _planar_conv_sq_norms(
    conv, a: torch.Tensor, g: torch.Tensor, padding, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight squared norms of a 2-D, groups=1 convolution by the cheapest exact route: ghost norm
    on the padded input's Gram matrix, or materialisation through im2col (blocks of samples)
    or, when one sample's im2col alone is large, through the convolution backward with the batch
    folded into the groups (no im2col at all). ``scale``: see :func:`conv_rule` (the routes that
    never form per-sample gradients apply it to ``g``)."""
    length = g.shape[2] * g.shape[3]
    d = conv.weight[0].numel()  # C_in x kernel area
    if FORCE_METHOD == "im2col":
        return _im2col_sq_norms(a, g, conv, padding, scale)
    if FORCE_METHOD == "grouped":
        return _grouped_sq_norms(conv, a, g, padding, scale)
    if use_ghost(_padded_gram_cost(a, g, conv, padding), length * d * g.shape[1]):
        return _padded_gram_sq_norms(a, _scaled(g, scale), conv, padding)
    if FORCE_METHOD == "materialize":
        return _shifted_window_sq_norms(a, _scaled(g, scale), conv, padding)
    if length * d * a.element_size() > IM2COL_BYTES:
        return _grouped_sq_norms(conv, a, g, padding, scale)
    return _im2col_sq_norms(a, g, conv, padding, scale)


def _scaled(g: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """g [N, C, ...] with channel c times scale[c]."""
    return g if scale is None else g * scale.view(1, -1, *[1] * (g.dim() - 2))


def _grouped_sq_norms(
    conv, a: torch.Tensor, g: torch.Tensor, padding, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 [N] weight squared norms through :func:`_per_sample_conv_weight_grads`, in blocks
    of samples (bounded memory for the per-sample gradients). A 3-D convolution's temporaries are
    one depth slab's input and output gradient per sample (see :func:`_depth_slabs`), and its
    blocks take up to VOLUME_BLOCK_BYTES."""
    size_a, size_g, budget = a[0].numel(), g[0].numel(), BLOCK_BYTES
    if len(conv.kernel_size) == 3 and not conv.transposed:
        slabs = -(-g[0, 0].numel() // SLAB_POSITIONS)  # about as many as _depth_slabs makes
        size_a, size_g, budget = -(-size_a // slabs), -(-size_g // slabs), VOLUME_BLOCK_BYTES
    per_sample = (size_a + size_g + conv.weight.numel()) * a.element_size()
    total = []
    for block in _sample_blocks(a.shape[0], per_sample, budget):
        grads = _per_sample_conv_weight_grads(conv, a[block], g[block], padding)
        total.append(squared_norms(_scaled(grads, scale)))
    return torch.cat(total)


class _As2d:
    """The hyper-parameters of a Conv1d seen as a Conv2d of height 1 (only what the rules read)."""

    def __init__(self, module: nn.Conv1d) -> None:
        self.kernel_size = (1, *module.kernel_size)
        self.stride = (1, *module.stride)
        self.dilation = (1, *module.dilation)
        self.weight = module.weight.unsqueeze(2)
        self.groups, self.transposed = 1, False


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
    return batchnorm_backward(module, a, g, input_grad=False)[1]


def batchnorm_backward(
    module: nn.modules.batchnorm._BatchNorm, a, g, input_grad: bool
) -> tuple[torch.Tensor | None, SquaredNorms]:
    """The input gradient of an eval-mode BatchNorm (when ``input_grad``) and the per-sample
    squared norms of its weight and bias gradients, from one batch-norm backward in which the
    batch is folded into the channels: sample n's channels are channels of their own, so the
    kernel's per-channel sums are per-sample sums."""
    n, c = a.shape[:2]
    folded = (1, n * c, *a.shape[2:]) if a.dim() > 2 else (1, n * c)
    # weight (ones without one), mean and variance, repeated for every sample in one copy (the
    # kernel reads them as contiguous: an expanded, zero-stride view would be read wrongly)
    stats = [module.running_mean, module.running_var]
    stats.insert(0, module.weight.detach() if module.weight is not None else stats[0].new_ones(c))
    stats = torch.stack(stats)
    if stats.dtype != a.dtype:
        stats = stats.to(a.dtype)
    weight, mean, var = stats.unsqueeze(1).expand(3, n, c).contiguous().view(3, n * c)
    # the saved statistics of eval mode are the running ones: the CUDA kernel requires them
    # (an internal assert without), the CPU one reads the running statistics
    invstd = torch.rsqrt(var + module.eps)
    grad_in, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        g.reshape(folded),
        a.reshape(folded),
        weight,
        mean,
        var,
        mean,
        invstd,
        False,
        module.eps,
        [input_grad, True, True],
    )
    return (grad_in.view(a.shape) if input_grad else None), _weight_and_bias(
        squared_norms(grad_w.view(n, c)) if _wants(module, "weight") else None,
        squared_norms(grad_b.view(n, c)) if _wants(module, "bias") else None,
    )


def layernorm_rule(module: nn.LayerNorm, a, g) -> SquaredNorms:
    # the normalised input by the layer-norm kernel itself (without affine parameters): one
    # pass, where mean and var take several (a var alone cost 6x the kernel, measured)
    x_hat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
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


_RULES: list[tuple[type, Rule]] = [
    (nn.Linear, linear_rule),
    (nn.modules.conv._ConvNd, conv_rule),
    (nn.modules.batchnorm._BatchNorm, batchnorm_rule),
    (nn.LayerNorm, layernorm_rule),
    (nn.GroupNorm, groupnorm_rule),
    (nn.Embedding, embedding_rule),
]
# the forwards the rules know (a subclass that overrides forward may compute anything)
_KNOWN_FORWARDS: dict[type, set] = {
    nn.modules.conv._ConvNd: {
        c.forward
        for c in (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
        )
    },
    nn.modules.batchnorm._BatchNorm: {
        nn.BatchNorm1d.forward,
        nn.BatchNorm2d.forward,
        nn.BatchNorm3d.forward,
        nn.modules.batchnorm._BatchNorm.forward,
    },
}


def rule_for(module: nn.Module) -> Rule | Composite | None:
    """The exact rule for ``module`` (a composite rule for modules that read their parameters
    outside their children's forwards, see :mod:`.composite`), or None when it needs the generic
    fallback (an unsupported type, a subclass with its own forward, or BatchNorm that normalises
    with batch statistics)."""
    if "forward" in vars(module):  # an instance-level forward: the rules cannot know it
        return None
    composite = composite_for(module)
    if composite is not None:
        return composite
    for base, rule in _RULES:
        if isinstance(module, base):
            own_forward = type(module).forward
            if own_forward not in _KNOWN_FORWARDS.get(base, {base.forward}):
                return None
            if base is nn.modules.batchnorm._BatchNorm and module.running_mean is None:
                return None
            return rule
    return None
