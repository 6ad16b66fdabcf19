"""Fast CPU inference: the model files' functions on faster CPU kernels, used only where they compute the same.

Every SeMask model calls `use_cpu_inference_kernels` when it is built, so `from_pretrained(...)` + `eval()` on a
CPU, `semask.inference`, the pipeline and the CLI run fast without extra calls. Each fast module and the attention
function below check `runs_cpu_inference` on every call and otherwise run the plain forward: training, autograd,
autocast, torch.compile / torch.export and other devices compute exactly what the model files say.
`use_plain_modules(model)` turns the fast path off.

What runs faster, and why:
- SDPA (the default attention) of the window and semantic attention runs as two matmuls, adding the mask in place:
  PyTorch's CPU SDPA kernel is slower on Swin's 49-token windows, and has no fused kernel when the queries and keys
  (one channel per class) differ in width from the values, as in the semantic attention.
- Linear layers run on oneDNN's kernel (the one inductor's frozen CPU graphs call), faster than BLAS for Swin's
  narrow layers. It applies the Swin MLP's exact GELU and adds residuals while it writes the output; the semantic
  attention's two class projections run as one call.
- A Conv-BN-ReLU block is one oneDNN convolution with the batch norm folded into its weights.
- Semantic layers take a batch one image at a time: their temporaries (class scores, attention weights) are then one
  image's size, which the CPU allocator reuses instead of mapping fresh memory for each.
"""

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from transformers.activations import GELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.upernet.modeling_upernet import UperNetConvModule

from .modeling_semask import ALL_ATTENTION_FUNCTIONS, SemaskSemanticAttention, SemaskSemanticLayer, SemaskSwinLayer


def runs_cpu_inference(module: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether `module` takes the fast path on `inputs`: float32 CPU tensors, eval mode, no autograd, no autocast,
    not compiling or exporting (inductor makes its own kernel choices there), and PyTorch built with oneDNN."""
    return (
        not module.training
        and not torch.is_grad_enabled()
        and inputs.device.type == "cpu"
        and inputs.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and torch.backends.mkldnn.is_available()
    )


def cpu_inference_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, as two matmuls in CPU inference (outputs (batch, tokens, heads, dim))."""
    if not runs_cpu_inference(module, query):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scores = torch.matmul(query, key.transpose(-1, -2))
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if scaling != 1:
        scores = scores.mul_(scaling)
    if attention_mask is not None:
        scores = scores.add_(attention_mask)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (with the dtype: a faster CPU kernel)
    return torch.matmul(weights, value).transpose(1, 2), None


ALL_ATTENTION_FUNCTIONS["sdpa"] = cpu_inference_sdpa


def onednn_linear(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """`activation(inputs @ weightᵀ + bias)`, plus `residual` if given, in one oneDNN call."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(inputs, residual, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise.default(
        inputs, weight, bias, activation, [], "none" if activation == "gelu" else ""
    )


class CpuLinear(nn.Linear):
    """`nn.Linear` on oneDNN's kernel in CPU inference."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not runs_cpu_inference(self, inputs):
            return super().forward(inputs)
        return onednn_linear(inputs, self.weight, self.bias)


class CpuConvModule(UperNetConvModule):
    """transformers' Conv-BN-ReLU block as one oneDNN convolution with the batch norm folded in, then a ReLU."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        conv, norm = self.conv, self.batch_norm
        folds = (
            norm.running_var is not None
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and type(self.activation) is nn.ReLU
        )
        if not (folds and runs_cpu_inference(self, inputs)):
            return super().forward(inputs)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        outputs = torch.ops.mkldnn._convolution_pointwise(
            inputs, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "none", [], ""
        )
        return torch.relu_(outputs)  # not oneDNN's fused ReLU: that maps NaN to 0, where ReLU propagates it


class CpuSemanticAttention(SemaskSemanticAttention):
    """The semantic attention block with both class projections in one call and the gated residual fused into the
    output projection."""

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not runs_cpu_inference(self, hidden_states):
            return super().project(hidden_states)
        layers = (self.q_proj, self.k_proj)
        biases = [layer.weight.new_zeros(layer.out_features) if layer.bias is None else layer.bias for layer in layers]
        weight = torch.cat([layer.weight for layer in layers])
        scores = onednn_linear(hidden_states, weight, torch.cat(biases))  # (the prior and key are views of it)
        prior, key = scores.split([layer.out_features for layer in layers], dim=-1)
        return prior, key, self.v_proj(hidden_states)

    def add_output(self, hidden_states: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        if not runs_cpu_inference(self, attn_output):
            return super().add_output(hidden_states, attn_output)
        layer = self.o_proj  # gamma folded into its (small) weights
        bias = None if layer.bias is None else self.gamma * layer.bias
        return onednn_linear(attn_output, self.gamma * layer.weight, bias, residual=hidden_states)


class CpuSwinLayer(SemaskSwinLayer):
    """The Swin block with the attention residual added in place and the MLP's exact GELU and residual fused."""

    def add_attention(self, shortcut: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        if not runs_cpu_inference(self, attention_output):
            return super().add_attention(shortcut, attention_output)
        return attention_output.add_(shortcut)  # the merged windows are this call's own copy

    def add_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not (type(self.mlp.activation_fn) is GELUActivation and runs_cpu_inference(self, hidden_states)):
            return super().add_mlp(hidden_states)
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        hidden = onednn_linear(self.layernorm_after(hidden_states), fc1.weight, fc1.bias, activation="gelu")
        return onednn_linear(hidden, fc2.weight, fc2.bias, residual=hidden_states)


class CpuSemanticLayer(SemaskSemanticLayer):
    """The semantic layer taking a batch one image at a time (in SDPA mode: eager mode records each block's attention
    weights for the whole batch)."""

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not (
            hidden_states.shape[0] > 1
            and self.config._attn_implementation == "sdpa"
            and runs_cpu_inference(self, hidden_states)
        ):
            return super().forward(hidden_states, size)
        outputs = [super(CpuSemanticLayer, self).forward(image, size) for image in hidden_states.split(1)]
        return torch.cat([output for output, _ in outputs]), torch.cat([prior for _, prior in outputs])


FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: CpuLinear,
    UperNetConvModule: CpuConvModule,
    SemaskSemanticAttention: CpuSemanticAttention,
    SemaskSwinLayer: CpuSwinLayer,
    SemaskSemanticLayer: CpuSemanticLayer,
}
PLAIN_CLASSES = {fast: plain for plain, fast in FAST_CLASSES.items()}


def use_cpu_inference_kernels(model: nn.Module) -> nn.Module:
    """Give the modules of `model` their fast CPU-inference class (same parameters and state-dict keys)."""
    return _swap_classes(model, FAST_CLASSES)


def use_plain_modules(model: nn.Module) -> nn.Module:
    """Turn the fast path off: the modules of `model` get back their plain class."""
    return _swap_classes(model, PLAIN_CLASSES)


def _swap_classes(model: nn.Module, classes: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    for module in model.modules():
        if type(module) in classes:
            module.__class__ = classes[type(module)]
    return model
