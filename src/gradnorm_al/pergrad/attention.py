"""Composite rules for attention: ``nn.MultiheadAttention`` and torchvision's vision transformer
(its encoder's positional table and its class token, both broadcast over the batch).

``nn.MultiheadAttention`` computes its projections inside ``F.multi_head_attention_forward``
(``out_proj`` is a child whose forward never runs), so no per-module rule sees them. Its
composite re-implements that function's computation (the explicit softmax when the weights are
asked for, ``scaled_dot_product_attention`` otherwise, as the stock code does), batch first
inside, and taps the outputs of the input projections (q, k, v; packed self-attention: one [N, L,
3E] projection; packed cross-attention: q and the packed kv; separate weights: three) and of the
output projection. Each projection is a linear map applied at every position, so the linear rule
(:func:`.layers.linear_sq_norms`: ghost norm or materialised gradient, by cost) on (input, output
gradient) gives its weight's and bias's per-sample squared norms; blocks of a packed weight are
disjoint rows of it, so their squared norms add. ``bias_k`` / ``bias_v`` are appended to every
sample's keys and values: their per-sample gradient is the key / value gradient at that appended
position, tapped on the broadcast copy. Covered: packed and separate projections, biases or none,
``add_bias_kv``, ``add_zero_attn``, ``key_padding_mask``, ``attn_mask`` (bool or float, 2-D or
per-sample 3-D), ``need_weights``, ``average_attn_weights``, ``is_causal``, ``batch_first``
either way, dropout in eval mode. Unbatched (2-D) inputs, nested tensors and dropout in training
mode go to the exact whole-model path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .composite import Composite, CompositeContext, register
from .layers import linear_sq_norms, squared_norms


def _tap_linear(
    ctx: CompositeContext,
    x: torch.Tensor,
    out: torch.Tensor,
    weight: str | None,
    bias: str | None,
    batch_dim: int = 0,
) -> None:
    """Tap ``out`` = x W^T + b (both with the batch in ``batch_dim``): the linear rule adds the
    per-sample squared norms of parameter ``weight``'s and ``bias``'s gradients (either may be a
    block of rows of a packed parameter, or None)."""
    want_w = weight is not None and ctx.wants(weight)
    want_b = bias is not None and ctx.wants(bias)
    if not (want_w or want_b):
        return
    a = ctx.keep(x).movedim(batch_dim, 0) if want_w else None

    def fn(g: torch.Tensor) -> None:
        g = g.movedim(batch_dim, 0)
        w_sq, b_sq = linear_sq_norms(g if a is None else a, g, want_w, want_b)
        if w_sq is not None:
            ctx.add(weight, w_sq)
        if b_sq is not None:
            ctx.add(bias, b_sq)

    ctx.on_grad(out, fn)


def _tap_broadcast(ctx: CompositeContext, t: torch.Tensor, name: str) -> None:
    """Tap a parameter expanded over the batch (dim 0): row n of its gradient is sample n's."""
    if ctx.wants(name):
        ctx.on_grad(t, lambda g: ctx.add(name, squared_norms(g)))


def _pad_last(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


class MultiheadAttentionComposite(Composite):
    """``nn.MultiheadAttention`` (see the module docstring)."""

    def forward(
        self,
        module: nn.MultiheadAttention,
        ctx: CompositeContext,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if query.dim() != 3:
            ctx.fallback("got an unbatched input")
        if query.is_nested or key.is_nested or value.is_nested:
            ctx.fallback("got a nested tensor")
        if module.training and module.dropout > 0:
            ctx.fallback("applies attention dropout (training mode)")
        heads, batch_first = module.num_heads, module.batch_first
        # the layout, declared on the tensors as passed (the engine checks it at two batch sizes)
        batch_dim = 0 if batch_first else 1
        for t in (query, key, value):
            ctx.batch(t, batch_dim)
        if key_padding_mask is not None and key_padding_mask.dim() == 2:
            ctx.batch(key_padding_mask, 0)
        if attn_mask is not None and attn_mask.dim() == 3:
            ctx.batch(attn_mask, 0, per_sample=heads)  # [N * heads, L, S]
        F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, heads)

        # masks: as nn.MultiheadAttention.forward, then F.multi_head_attention_forward, make them
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention's own causal mask
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False

        # batch first inside ([N, L, E]), keeping which of query, key, value are one tensor
        self_attention, kv_same = query is key and key is value, key is value
        if not batch_first:
            q_in = query.transpose(0, 1)
            k_in = q_in if query is key else key.transpose(0, 1)
            v_in = k_in if kv_same else value.transpose(0, 1)
        else:
            q_in, k_in, v_in = query, key, value
        n, tgt_len, embed_dim = q_in.shape
        src_len = k_in.shape[1]
        head_dim = embed_dim // heads
        if embed_dim != module.embed_dim or head_dim * heads != embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {module.embed_dim}, but got {embed_dim}"
            )

        # input projections, tapped
        w, b = module.in_proj_weight, module.in_proj_bias
        bias = "in_proj_bias" if b is not None else None
        if module._qkv_same_embed_dim:
            if self_attention:
                proj = F.linear(q_in, w, b)
                _tap_linear(ctx, q_in, proj, "in_proj_weight", bias)
                q, k, v = proj.unflatten(-1, (3, embed_dim)).unbind(-2)
            elif kv_same:
                w_q, w_kv = w.split([embed_dim, 2 * embed_dim])
                b_q, b_kv = (None, None) if b is None else b.split([embed_dim, 2 * embed_dim])
                q = F.linear(q_in, w_q, b_q)
                kv = F.linear(k_in, w_kv, b_kv)
                _tap_linear(ctx, q_in, q, "in_proj_weight", bias)
                _tap_linear(ctx, k_in, kv, "in_proj_weight", bias)
                k, v = kv.unflatten(-1, (2, embed_dim)).unbind(-2)
            else:
                w_q, w_k, w_v = w.chunk(3)
                b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
                q, k, v = (
                    F.linear(t, w_i, b_i)
                    for t, w_i, b_i in ((q_in, w_q, b_q), (k_in, w_k, b_k), (v_in, w_v, b_v))
                )
                for t, out in ((q_in, q), (k_in, k), (v_in, v)):
                    _tap_linear(ctx, t, out, "in_proj_weight", bias)
        else:
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            q = F.linear(q_in, module.q_proj_weight, b_q)
            k = F.linear(k_in, module.k_proj_weight, b_k)
            v = F.linear(v_in, module.v_proj_weight, b_v)
            _tap_linear(ctx, q_in, q, "q_proj_weight", bias)
            _tap_linear(ctx, k_in, k, "k_proj_weight", bias)
            _tap_linear(ctx, v_in, v, "v_proj_weight", bias)

        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)  # [1, L, S] (3-D ones are [N * heads, L, S])
        if module.bias_k is not None and module.bias_v is not None:
            bias_k = module.bias_k.expand(n, 1, embed_dim)
            bias_v = module.bias_v.expand(n, 1, embed_dim)
            _tap_broadcast(ctx, bias_k, "bias_k")
            _tap_broadcast(ctx, bias_v, "bias_v")
            k, v = torch.cat([k, bias_k], dim=1), torch.cat([v, bias_v], dim=1)
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        elif module.bias_k is not None or module.bias_v is not None:
            raise AssertionError("bias_k and bias_v must be set together")

        # heads: [N, heads, L, head_dim]
        q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        if module.add_zero_attn:
            zeros = k.new_zeros(n, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        src_len = k.shape[2]
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, src_len, n)
            key_padding_mask = (
                key_padding_mask.view(n, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(n * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = module.dropout if module.training else 0.0  # 0 here (checked above)

        if need_weights:
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            q3 = q.reshape(n * heads, tgt_len, head_dim) * math.sqrt(1.0 / float(head_dim))
            k3 = k.reshape(n * heads, src_len, head_dim)
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q3, k3.transpose(-2, -1))
            else:
                weights = torch.bmm(q3, k3.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            attn = torch.bmm(weights, v.reshape(n * heads, src_len, head_dim))
            attn = attn.view(n, heads, tgt_len, head_dim)
        else:
            weights = None
            if attn_mask is not None:
                if attn_mask.size(0) == 1:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(n, heads, -1, src_len)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)

        # output projection, tapped; the output laid out as the stock forward lays it out
        w_o, b_o = module.out_proj.weight, module.out_proj.bias
        b_name = "out_proj.bias" if b_o is not None else None
        if batch_first:
            o = attn.transpose(1, 2).reshape(n, tgt_len, embed_dim)
            out = F.linear(o, w_o, b_o)
            _tap_linear(ctx, o, out, "out_proj.weight", b_name)
        else:
            o = attn.permute(2, 0, 1, 3).reshape(tgt_len, n, embed_dim)
            out = F.linear(o, w_o, b_o)
            _tap_linear(ctx, o, out, "out_proj.weight", b_name, batch_dim=1)
        ctx.batch(out, batch_dim)
        if weights is not None:
            weights = weights.view(n, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            ctx.batch(weights, 0)
        return out, weights


@register
def _multihead_attention(module: nn.Module) -> Composite | None:
    if isinstance(module, nn.MultiheadAttention) and (
        type(module).forward is nn.MultiheadAttention.forward
    ):
        return MultiheadAttentionComposite()
    return None


# ------------------------------------------------------------------ torchvision's ViT
class ViTEncoderComposite(Composite):
    """torchvision's ``vision_transformer.Encoder``: ``input + pos_embedding`` ([1, L, D],
    broadcast over the batch), then its layers (hooked on their own) and final LayerNorm. The
    table is tapped as its view expanded to [N, L, D]: row n of that gradient is sample n's."""

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {"pos_embedding": module.pos_embedding}

    def forward(self, module: nn.Module, ctx: CompositeContext, input: torch.Tensor):
        torch._assert(
            input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}"
        )
        ctx.batch(input, 0)
        pos = module.pos_embedding.expand(input.shape[0], -1, -1)
        _tap_broadcast(ctx, pos, "pos_embedding")
        out = module.ln(module.layers(module.dropout(input + pos)))
        ctx.batch(out, 0)
        return out


class VisionTransformerComposite(Composite):
    """torchvision's ``VisionTransformer``: the class token ([1, 1, D]) expanded over the batch
    and put before the patch tokens; everything else is its children's (hooked on their own)."""

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {"class_token": module.class_token}

    def forward(self, module: nn.Module, ctx: CompositeContext, x: torch.Tensor):
        ctx.batch(x, 0)
        x = module._process_input(x)
        token = module.class_token.expand(x.shape[0], -1, -1)
        _tap_broadcast(ctx, token, "class_token")
        x = module.encoder(torch.cat([token, x], dim=1))
        out = module.heads(x[:, 0])
        ctx.batch(out, 0)
        return out


@register
def _vision_transformer(module: nn.Module) -> Composite | None:
    # torchvision is imported only for modules that come from it (exact types: a subclass
    # that overrides forward, or the input processing, may compute anything)
    if type(module).__module__ != "torchvision.models.vision_transformer":
        return None
    from torchvision.models import vision_transformer as vit

    cls = type(module)
    if isinstance(module, vit.Encoder) and cls.forward is vit.Encoder.forward:
        return ViTEncoderComposite()
    if (
        isinstance(module, vit.VisionTransformer)
        and cls.forward is vit.VisionTransformer.forward
        and cls._process_input is vit.VisionTransformer._process_input
    ):
        return VisionTransformerComposite()
    return None
