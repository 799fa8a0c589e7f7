"""Conv + ReLU / residual-add fusion into oneDNN post-ops, for eager CNN encoders on the CPU.

An eager ResNet runs every ReLU and residual add as its own pass over activations that are
~100 MB per batch; `torch.compile` folds them into the convolutions' oneDNN post-ops but
costs ~15-25 s per process. This rewrites the traced graph so that each `Conv2d` followed by
`relu`, by `add`, or by `add` then `relu` becomes one `torch.ops.mkldnn._convolution_pointwise`
call (the op inductor emits for the same patterns on CPU, with the same "relu"/"add"
attributes), at no compile cost: 1.15x eager resnet50_trunc in bf16 (docs/benchmarks.md).
Every other node is left as it was and still runs under the caller's autocast.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..device import cpu_has_bf16

log = logging.getLogger("wsi_mil")

_ADDS = (operator.add, operator.iadd, torch.add)


class FusedConv2d(nn.Module):
    """`relu?(conv(x) [+ other])` as one oneDNN convolution with post-ops, channels-last."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, relu: bool):
        super().__init__()
        weight = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.relu = relu

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if other is None:
            attr = "relu" if self.relu else "none"
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, *self.geometry, attr, [], ""
            )
        other = other.to(self.weight.dtype)
        unary = "relu" if self.relu else None
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, *self.geometry, "add", 1.0, unary, [], ""
        )


def fuse_conv_pointwise(net: nn.Module, dtype: torch.dtype, input_size: int) -> tuple[nn.Module, int]:
    """`net` with conv+relu, conv+add and conv+add+relu fused (oneDNN post-ops), and how many
    convolutions were fused. Returns `(net, 0)` unchanged when nothing can be fused: a net
    torch.fx cannot trace, no plain (groups 1, 2-d) convolution followed by relu or add, no
    oneDNN, a dtype other than fp32/bf16, or bf16 on a CPU without bf16 units (oneDNN's fused
    bf16 kernels need AVX-512 or AVX-NE-CONVERT; the unfused bf16 path runs everywhere)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return net, 0
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        return net, 0
    if sum(_plain_conv(m) for m in net.modules()) < 2:  # a ViT's patch embedding: nothing to fuse
        return net, 0
    try:
        gm = fx.symbolic_trace(net)
        with torch.no_grad():  # output shapes, to fuse only same-shape (non-broadcast) adds
            ShapeProp(gm).propagate(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:  # dynamic control flow, or not a CNN on square images
        log.debug("oneDNN fusion skipped: %s", exc)
        return net, 0
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):  # timm's placeholder layers (drop_block, aa) sit between conv and act
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    shape = {n: getattr(n.meta.get("tensor_meta"), "shape", None) for n in gm.graph.nodes}
    fused, folded = 0, set()  # folded: add/relu nodes already inside a fused convolution
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not _plain_conv(conv) or len(node.users) != 1 or next(iter(node.users)) in folded:
            continue
        last, other, relu = node, None, False
        user = next(iter(node.users))
        if user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 and not user.kwargs:
            (operand,) = [a for a in user.args if a is not node] or [None]
            same_shape = shape[node] is not None and shape.get(operand) == shape[node]
            if isinstance(operand, fx.Node) and same_shape:
                last, other = user, operand
        if len(last.users) == 1 and _is_relu(next(iter(last.users)), modules):
            last, relu = next(iter(last.users)), True
        if last is node:
            continue
        name = f"{node.target.replace('.', '_')}_fused"
        gm.add_submodule(name, FusedConv2d(conv, dtype, relu))
        with gm.graph.inserting_after(last):
            new = gm.graph.call_module(name, (node.args[0],) if other is None else (node.args[0], other))
        last.replace_all_uses_with(new)
        folded.update(n for n in (user, last) if n is not node)
        shape[new] = shape.get(last)
        fused += 1
    if not fused:
        return net, 0
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, fused


def _plain_conv(module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)  # not "same"/"valid"
    )


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    return node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu)
