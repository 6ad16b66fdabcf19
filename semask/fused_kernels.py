"""Linear layers and Conv-BN-ReLU blocks that run on oneDNN's fused kernels for inference on CPUs.

On CPUs `F.linear` runs on BLAS; oneDNN's linear kernel (the one inductor's frozen CPU graphs call) is faster for
Swin's narrow layers (96 to 768 channels, 150 classes) and applies an exact GELU or adds a residual while it writes
the output, which saves a pass over memory. Likewise a Conv-BN-ReLU block in eval mode is one oneDNN convolution
with the batch norm folded into its weights. They are used only where they compute
the same function: float32 tensors on CPU, nothing that needs gradients, no autocast, and not inside
torch.compile / torch.export (inductor makes its own choice there). Everywhere else these are the plain modules.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from transformers.models.upernet.modeling_upernet import UperNetConvModule


def onednn_applies(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's CPU kernels compute the layer of `weight` on `inputs` here (see the module docstring)."""
    return (
        inputs.device.type == "cpu"
        and inputs.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (inputs, weight)))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and torch.backends.mkldnn.is_available()
    )


def linear(
    inputs: torch.Tensor, layer: nn.Linear, residual: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """`residual + scale * layer(inputs)`, where `residual` and `scale` are optional."""
    weight, bias = layer.weight, layer.bias
    if not onednn_applies(inputs, weight):
        outputs = F.linear(inputs, weight, bias)
        outputs = outputs if scale is None else scale * outputs
        return outputs if residual is None else residual + outputs
    if scale is not None:  # folded into the (small) weights: the kernel then adds the residual
        weight, bias = scale * weight, None if bias is None else scale * bias
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise.default(inputs, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(inputs, residual, weight, bias, "add")


def paired_linear(inputs: torch.Tensor, first: nn.Linear, second: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """`first(inputs), second(inputs)`; on oneDNN, one call with both layers' weights stacked (the two outputs are
    then views of one tensor, with a row stride of both widths). Two 150-class projections run faster as one."""
    if not (onednn_applies(inputs, first.weight) and onednn_applies(inputs, second.weight)):
        return first(inputs), second(inputs)
    layers = (first, second)
    biases = [layer.weight.new_zeros(layer.out_features) if layer.bias is None else layer.bias for layer in layers]
    outputs = torch.ops.mkldnn._linear_pointwise.default(
        inputs, torch.cat([first.weight, second.weight]), torch.cat(biases), "none", [], ""
    )
    return outputs.split([first.out_features, second.out_features], dim=-1)


def linear_gelu(inputs: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`gelu(layer(inputs))` with the exact (erf) GELU."""
    if not onednn_applies(inputs, layer.weight):
        return F.gelu(F.linear(inputs, layer.weight, layer.bias))
    return torch.ops.mkldnn._linear_pointwise.default(inputs, layer.weight, layer.bias, "gelu", [], "none")


class FusedLinear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) that runs on oneDNN where `onednn_applies`."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return linear(inputs, self)


def use_fused_linears(module: nn.Module) -> None:
    """Turn the plain `nn.Linear` layers inside `module` into `FusedLinear` (a class change: weights stay)."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = FusedLinear


class FusedConvModule(UperNetConvModule):
    """transformers' Conv-BN-ReLU block (same parameters and state-dict keys); in eval mode, where `onednn_applies`,
    one oneDNN convolution with the batch norm's running statistics folded into its weights, then an in-place ReLU."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        conv, norm = self.conv, self.batch_norm
        parameters = [p for p in (conv.weight, conv.bias, norm.weight, norm.bias) if p is not None]
        folds = (
            not norm.training
            and norm.running_var is not None
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and type(self.activation) is nn.ReLU
        )
        if not (folds and all(onednn_applies(inputs, parameter) for parameter in parameters)):
            return super().forward(inputs)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        outputs = torch.ops.mkldnn._convolution_pointwise(
            inputs, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "none", [], ""
        )
        return torch.relu_(outputs)  # not oneDNN's fused ReLU: that maps NaN to 0, where ReLU propagates it
