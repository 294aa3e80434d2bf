"""The int8 image tower's source graph: the image tower traced with a dynamic batch, with two rewrites that
give the same numbers in fp32 and run faster in ONNX Runtime once quantised (measured in
docs/decisions/int8-engine.md):

- a patch embedding (a Conv2d whose kernel equals its stride, no padding) becomes a reshape and a matrix
  product. The quantiser leaves that product alone (`pixel_matmuls` names it): pixels quantised with one
  scale per image cost a fine-tuned model a cosine of 0.996 to fp32. `exact_pixel_products` then makes
  it an int8 product of its own kind over the image's 8-bit pixels, which the graph then takes as its
  input (uint8): it multiplies them by int8 weights with the normalisation folded in and scales back per
  output channel. Only the weights are rounded, as in every other int8 product, and the worker skips the
  float normalisation altogether;
- a self-attention block (torch's nn.MultiheadAttention, batch first, one packed in-projection) becomes
  ONNX Runtime's fused Attention operator (com.microsoft), which the quantiser turns into QAttention: the
  in-projection in int8 and the heads' split, scores, softmax and merge in one kernel, instead of some
  forty Split, Squeeze, Transpose and MatMul nodes per layer.

Modules that do not match stay as they are (the graph is then only as fast as before, never different).

Once quantised (ONNX Runtime's dynamic quantisation: activation scales computed per call),
`static_activation_scales` fixes each activation's scale from its range over calibration images
(`activation_ranges`), so that a batch runs as one call without an image's vector depending on its batch
mates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ORT_DOMAIN = "com.microsoft"
PIXELS = "pixels"  # the int8 graph's input when it takes 8-bit pixels


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


def _pixel_chain(graph) -> tuple[set, set]:
    """(names of the nodes, names of the tensors) that carry the graph's first input on through reshapes,
    transposes and slices only, the input included: what a patch embedding's product reads."""
    chain, tensors = set(), {graph.input[0].name}
    for node in graph.node:  # topological order
        if node.op_type in ("Reshape", "Transpose", "Slice", "Identity", "Flatten") and node.input[0] in tensors:
            chain.add(node.name)
            tensors.update(node.output)
    return chain, tensors


def pixel_matmuls(path: str) -> list[str]:
    """Names of the MatMul nodes that multiply the input pixels themselves (reached from the graph's input
    through reshapes, transposes and slices only): the patch embeddings, kept fp32 when quantising."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    _, pixels = _pixel_chain(graph)
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[0] in pixels]


def exact_pixel_products(path: str, names: list[str], mean, std, weight_bits: int) -> list[str]:
    """Rewrite, in the quantised graph at `path`, each fp32 MatMul in `names` (a patch embedding: its
    first input is the input image, reshaped) as an int8 product over the image's 8-bit pixels:

        out = Cast<float>(MatMulInteger(patches(pixels) - 128, Wq)) * scale + bias

    where W' = W / (255 std) per input channel, Wq = round(W' / scale) with one scale per output column
    (127 steps, or 63 with 7-bit weights: AVX2's u8 x s8 pair sums must not saturate), and bias =
    128 sum(W') - sum(W mean / std): the same product as W . image. The pixels are centred on 128 (the
    product's zero point) so that the weights' rounding is not multiplied by the pixels' large mean: its
    error is then that of rounding W itself (0.42% of the output's norm on the fine-tuned demo model,
    against 1.9% uncentred). Returns the names rewritten; the others stay fp32.
    Where only those products (and Shapes) read the image, the graph's input becomes `pixels`, (batch, C,
    H, W) uint8.
    Otherwise it keeps its float input and recovers the pixels from it in front of the products,
    pixels = Cast<uint8>(Clip(Round(image * 255 std + 255 mean), 0, 255)) per channel, which is exact
    for a normalised image of 0-255 pixels (a pixel step is far wider than float32's rounding)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    g = model.graph
    image = g.input[0].name
    inits = {i.name: i for i in g.initializer}
    chain, feeds = _pixel_chain(g)  # the nodes between the image and the products: they now carry uint8
    done, nodes = [], []
    qmax = 127 if weight_bits == 8 else 63
    std64, mean64 = np.asarray(std, np.float64), np.asarray(mean, np.float64)
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.name not in names or w is None or node.input[0] not in feeds:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(w).astype(np.float64)  # [K, D], K ordered (channel, dy, dx)
        per_channel = w.shape[0] // len(std64)
        s_k, m_k = np.repeat(std64, per_channel), np.repeat(mean64, per_channel)
        w_pix = w / (255.0 * s_k)[:, None]
        scale = np.abs(w_pix).max(0) / qmax
        scale[scale == 0] = 1.0
        tag = node.name.strip("/").replace("/", "_")
        g.initializer.extend([
            numpy_helper.from_array(np.clip(np.rint(w_pix / scale), -qmax, qmax).astype(np.int8), f"{tag}_wq"),
            numpy_helper.from_array(scale.astype(np.float32), f"{tag}_scale"),
            numpy_helper.from_array((128.0 * w_pix.sum(0) - (w * (m_k / s_k)[:, None]).sum(0)).astype(np.float32),
                                    f"{tag}_bias"),
            numpy_helper.from_array(np.array(128, np.uint8), f"{tag}_a_zero"),
            numpy_helper.from_array(np.array(0, np.int8), f"{tag}_w_zero")])
        nodes += [
            helper.make_node("MatMulInteger", [node.input[0], f"{tag}_wq", f"{tag}_a_zero", f"{tag}_w_zero"],
                             [f"{tag}_i32"], name=f"{node.name}_int8"),
            helper.make_node("Cast", [f"{tag}_i32"], [f"{tag}_f32"], to=TensorProto.FLOAT, name=f"{node.name}_cast"),
            helper.make_node("Mul", [f"{tag}_f32", f"{tag}_scale"], [f"{tag}_scaled"], name=f"{node.name}_scale"),
            helper.make_node("Add", [f"{tag}_scaled", f"{tag}_bias"], list(node.output), name=f"{node.name}_bias")]
        done.append(node.name)
    if not done:
        return []
    readers = [n for n in nodes if image in n.input]
    if all(n.name in chain or n.op_type == "Shape" for n in readers):
        # only the patch products read the image (and Shapes, which read the same shape off the pixels): the
        # graph takes the 8-bit pixels themselves, (batch, C, H, W) uint8 (the engine feeds
        # Transform.pixels; a float image is turned back into its pixels first)
        for node in readers:
            node.input[0] = PIXELS
        g.input[0].name = PIXELS
        g.input[0].type.tensor_type.elem_type = TensorProto.UINT8
        front = []
    else:
        # something else reads the normalised image too: the graph recovers the pixels in front of the
        # reshapes that cut it into patches, from its float input
        front = _pixel_front(g, image, mean64, std64)
        for node in nodes:
            if node.name in chain and node.input[0] == image:
                node.input[0] = PIXELS
    del g.node[:]
    g.node.extend(front + nodes)
    del g.value_info[:]  # the patch chain's tensors are uint8 now; ONNX Runtime infers the types again
    onnx.save(model, path)
    return done


def _pixel_front(g, image: str, mean64: np.ndarray, std64: np.ndarray) -> list:
    """The nodes (their constants added to `g`) that turn the normalised float `image` back into its 8-bit
    pixels, PIXELS: Cast<uint8>(Clip(Round(image * 255 std + 255 mean), 0, 255)) per channel."""
    from onnx import TensorProto, helper, numpy_helper

    shape = (1, len(std64), 1, 1)
    g.initializer.extend([
        numpy_helper.from_array((255.0 * std64).reshape(shape).astype(np.float32), "pixels_per_unit"),
        numpy_helper.from_array((255.0 * mean64).reshape(shape).astype(np.float32), "pixels_at_zero"),
        numpy_helper.from_array(np.array(0, np.float32), "pixels_min"),
        numpy_helper.from_array(np.array(255, np.float32), "pixels_max")])
    return [helper.make_node("Mul", [image, "pixels_per_unit"], ["pixels_scaled"], name="pixels_scale"),
            helper.make_node("Add", ["pixels_scaled", "pixels_at_zero"], ["pixels_shifted"], name="pixels_shift"),
            helper.make_node("Round", ["pixels_shifted"], ["pixels_rounded"], name="pixels_round"),
            helper.make_node("Clip", ["pixels_rounded", "pixels_min", "pixels_max"], ["pixels_clipped"],
                             name="pixels_clip"),
            helper.make_node("Cast", ["pixels_clipped"], [PIXELS], to=TensorProto.UINT8, name="pixels_u8")]


def export(image_tower: nn.Module, visual: nn.Module, image_size: int, path: str, opset: int) -> dict:
    """Trace `image_tower` (the normalised encode_image), with `visual`'s modules rewritten, to `path`, its
    batch dimension dynamic ("batch"); returns the rewrite counts."""
    sample = torch.zeros(1, 3, image_size, image_size)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused fast path has no ONNX symbol
    try:
        with rewritten(visual) as counts, torch.no_grad():
            torch.onnx.export(image_tower, (sample,), path, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["embedding"],
                              dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
                              custom_opsets={ORT_DOMAIN: 1})
            shape = tuple(image_tower(sample).shape)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    # the fused operator has no shape function in the exporter: state the output's shape, [batch, dim]
    import onnx

    graph = onnx.load(path)
    out = graph.graph.output[0].type.tensor_type
    out.ClearField("shape")
    out.shape.dim.add().dim_param = "batch"
    for size in shape[1:]:
        out.shape.dim.add().dim_value = size
    onnx.save(graph, path)
    return counts


def activation_ranges(path: str, feeds: list[dict]) -> dict:
    """{tensor: (lowest, highest)} over `feeds` (each one call's inputs) of each tensor that the dynamically
    quantised graph at `path` quantises on the fly (its DynamicQuantizeLinear nodes' inputs), 0 always
    inside the range, as DynamicQuantizeLinear takes it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(path)
    names = [n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors must survive
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    lo, hi = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            lo[name], hi[name] = min(lo[name], float(value.min())), max(hi[name], float(value.max()))
    return {n: (lo[n], hi[n]) for n in names}


def static_activation_scales(path: str, out: str, ranges: dict, fuse: bool = True) -> int:
    """Write the dynamically quantised graph at `path` to `out` with each DynamicQuantizeLinear replaced by
    a QuantizeLinear of fixed scale and zero point, computed from `ranges` (activation_ranges) as
    DynamicQuantizeLinear computes them per call: uint8, scale = (hi - lo) / 255, zero point round(-lo /
    scale). An image's vector then no longer depends on what else is in its call, so a batch runs as one
    call; values outside the range saturate. With `fuse`, fuse_integer_products then folds each product's
    float epilogue into it. Returns the number of nodes replaced."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    g = model.graph
    count = 0
    for node in g.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        lo, hi = ranges[node.input[0]]
        scale = (hi - lo) / 255.0 or 1.0
        zero = int(np.clip(np.rint(-lo / scale), 0, 255))
        y, y_scale, y_zero = node.output
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), y_scale),
                              numpy_helper.from_array(np.array(zero, np.uint8), y_zero)])
        node.op_type = "QuantizeLinear"
        node.input.extend([y_scale, y_zero])
        del node.output[:]
        node.output.append(y)
        count += 1
    if fuse:
        fuse_integer_products(g)
    onnx.save(model, out)
    return count


def fuse_integer_products(g) -> int:
    """In graph `g`, fold each int8 product's float epilogue into the product: MatMulInteger -> Cast<float>
    -> Mul by a constant scale (a constant, or a Mul of the activation's scalar scale and the weights'
    per-column scales) [-> Add of a constant bias] becomes one MatMulIntegerToFloat (com.microsoft), whose
    kernel scales and adds the bias as it writes its output, instead of three more passes over it. With
    scales computed per call, ONNX Runtime fuses the same chain itself (DynamicQuantizeMatMul); with
    constant scales its fusion no longer matches. Returns the number of products fused."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in g.initializer}
    nodes = list(g.node)  # these very objects are put back below
    producer = {o: n for n in nodes for o in n.output}
    readers: dict = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in g.output}

    def only_reader(name):
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and name not in outputs else None

    def const(name, scalar=False):
        t = inits.get(name)
        return t is not None and (int(np.prod(t.dims)) == 1 if scalar else len(t.dims) <= 1)

    replace, drop = {}, set()
    for node in nodes:
        if node.op_type != "MatMulInteger" or len(node.input) != 4 or node.input[1] not in inits:
            continue
        cast = only_reader(node.output[0])
        mul = cast is not None and cast.op_type == "Cast" and only_reader(cast.output[0])
        if not mul or mul.op_type != "Mul":
            continue
        scale = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        made = producer.get(scale)
        if const(scale):  # one scale per column (or per tensor): the activation's own scale is 1
            a_scale, b_scale = f"{node.name}_unit_scale", scale
            g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), a_scale))
        elif made is not None and made.op_type == "Mul" and const(made.input[0], scalar=True) and const(made.input[1]):
            a_scale, b_scale = made.input
        else:
            continue
        add, bias = only_reader(mul.output[0]), None
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
            bias = other if const(other) else None
        inputs = [node.input[0], node.input[1], a_scale, b_scale, node.input[2], node.input[3]] + ([bias] if bias else [])
        replace[id(node)] = helper.make_node("MatMulIntegerToFloat", inputs, [add.output[0] if bias else mul.output[0]],
                                             name=f"{node.name}_to_float", domain=ORT_DOMAIN)
        drop.update({id(cast), id(mul)} | ({id(add)} if bias else set()))
    fused = len(replace)
    kept = [replace.get(id(n), n) for n in nodes if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    return fused
