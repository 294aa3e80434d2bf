"""The int8 image tower's source graph: the image tower traced at batch 1, with two rewrites that give the
same numbers in fp32 and run faster in ONNX Runtime once quantised (bench/int8_source.py measures them):

- a patch embedding (a Conv2d whose kernel equals its stride, no padding) becomes a reshape and a matrix
  product, which the quantiser turns into an int8 product like every other; a Conv stays fp32 (and
  ConvInteger is slower than the fp32 Conv);
- a self-attention block (torch's nn.MultiheadAttention, batch first, one packed in-projection) becomes
  ONNX Runtime's fused Attention operator (com.microsoft), which the quantiser turns into QAttention: the
  in-projection in int8 and the heads' split, scores, softmax and merge in one kernel, instead of some
  forty Split, Squeeze, Transpose and MatMul nodes per layer.

Modules that do not match stay as they are (the graph is then only as fast as before, never different).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ORT_DOMAIN = "com.microsoft"


class PatchLinear(nn.Module):
    """A non-overlapping patch convolution (kernel == stride, no padding) as a matrix product over the
    image's patches: the same output, [B, out, H // p, W // p]."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.ph, self.pw = conv.kernel_size
        self.out_channels = conv.out_channels
        self.weight = conv.weight  # [out, in, ph, pw]: shared, not copied
        self.bias = conv.bias

    @staticmethod
    def applies(module: nn.Module) -> bool:
        return (isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.dilation) == (1, 1)
                and tuple(module.kernel_size) == tuple(module.stride) and module.padding in ((0, 0), "valid")
                and module.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        gh, gw = h // self.ph, w // self.pw
        x = x[:, :, :gh * self.ph, :gw * self.pw]  # what the convolution's stride leaves out
        patches = x.reshape(b, c, gh, self.ph, gw, self.pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        y = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return y.permute(0, 2, 1).reshape(b, self.out_channels, gh, gw)


class _Attention(torch.autograd.Function):
    """Self-attention with a packed in-projection: in torch, the math of nn.MultiheadAttention; in the
    graph, ONNX Runtime's Attention operator (input [B, S, D], weights [D, 3D], bias [3D])."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads: int):
        b, s, d = x.shape
        qkv = (x @ weight + bias).reshape(b, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return out.transpose(1, 2).reshape(b, s, d)

    @staticmethod
    def symbolic(g, x, weight, bias, heads: int):
        return g.op(f"{ORT_DOMAIN}::Attention", x, weight, bias, num_heads_i=heads)


class FusedSelfAttention(nn.Module):
    """Stands in for an nn.MultiheadAttention while tracing: self-attention without a mask goes to the
    fused operator; any other call goes to the module it replaces."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    @staticmethod
    def applies(module: nn.Module) -> bool:
        return (isinstance(module, nn.MultiheadAttention) and module.batch_first and module._qkv_same_embed_dim
                and module.in_proj_bias is not None and module.bias_k is None and module.bias_v is None
                and not module.add_zero_attn)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        if query is key is value and key_padding_mask is None and attn_mask is None and not kwargs.get("is_causal"):
            m = self.mha
            out = _Attention.apply(query, m.in_proj_weight.t(), m.in_proj_bias, m.num_heads)
            return m.out_proj(out), None
        return self.mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                        attn_mask=attn_mask, **kwargs)


@contextlib.contextmanager
def rewritten(tower: nn.Module) -> Iterator[dict]:
    """Swap the matching modules under `tower` for their rewrites while the block runs (tracing); yields
    the count of each kind swapped, and puts the originals back after."""
    swapped, counts = [], {"patch_linear": 0, "fused_attention": 0}
    for parent in list(tower.modules()):
        for name, child in list(parent.named_children()):
            if PatchLinear.applies(child):
                new, kind = PatchLinear(child), "patch_linear"
            elif FusedSelfAttention.applies(child):
                new, kind = FusedSelfAttention(child), "fused_attention"
            else:
                continue
            setattr(parent, name, new)
            swapped.append((parent, name, child))
            counts[kind] += 1
    try:
        yield counts
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def export(image_tower: nn.Module, visual: nn.Module, image_size: int, path: str, opset: int) -> dict:
    """Trace `image_tower` (the normalised encode_image) at batch 1, with `visual`'s modules rewritten,
    to `path`; returns the rewrite counts."""
    sample = torch.zeros(1, 3, image_size, image_size)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused fast path has no ONNX symbol
    try:
        with rewritten(visual) as counts, torch.no_grad():
            torch.onnx.export(image_tower, (sample,), path, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["embedding"],
                              custom_opsets={ORT_DOMAIN: 1})
            shape = tuple(image_tower(sample).shape)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    # the fused operator has no shape function in the exporter: state the output's shape, [1, dim]
    import onnx

    graph = onnx.load(path)
    out = graph.graph.output[0].type.tensor_type
    out.ClearField("shape")
    for size in shape:
        out.shape.dim.add().dim_value = size
    onnx.save(graph, path)
    return counts
