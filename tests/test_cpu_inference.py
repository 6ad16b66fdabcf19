"""oneDNN's fused linear and Conv-BN-ReLU kernels in CPU inference: same results as the plain layers, used only
where that holds."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semask.fused_kernels as fused_kernels
from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation
from semask.fused_kernels import FusedConvModule, FusedLinear, linear, linear_gelu, onednn_applies, paired_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def counted_kernel_calls(monkeypatch) -> list[str]:
    """Records each oneDNN linear call (by overload) while the test runs."""
    calls = []
    for overload in ("default", "binary"):
        kernel = getattr(torch.ops.mkldnn._linear_pointwise, overload)

        def recording(*args, _kernel=kernel, _name=overload):
            calls.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(fused_kernels.torch.ops.mkldnn._linear_pointwise, overload, recording)
    return calls


def test_fused_kernels_match_blas():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    inputs, residual, scale = torch.randn(3, 49, 24), torch.randn(3, 49, 40), torch.tensor([0.7])
    with torch.no_grad():
        expected = F.linear(inputs, layer.weight, layer.bias)
        torch.testing.assert_close(linear(inputs, layer), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(inputs, layer, residual=residual), residual + expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            linear(inputs, layer, residual=residual, scale=scale), residual + scale * expected, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(linear_gelu(inputs, layer), F.gelu(expected), atol=1e-5, rtol=1e-5)
        # strided inputs (a transposed view) too
        torch.testing.assert_close(
            linear(inputs.transpose(0, 1), layer), expected.transpose(0, 1), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("bias", [True, False])
def test_paired_linear_equals_both_layers(monkeypatch, bias):
    torch.manual_seed(0)
    first, second = nn.Linear(24, 15, bias=bias), nn.Linear(24, 15)
    inputs = torch.randn(3, 49, 24)
    calls = counted_kernel_calls(monkeypatch)
    with torch.no_grad():
        paired = paired_linear(inputs, first, second)
        for output, layer in zip(paired, (first, second)):
            torch.testing.assert_close(output, F.linear(inputs, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert calls == ["default"]
    assert paired[0].untyped_storage().data_ptr() == paired[1].untyped_storage().data_ptr()  # views of one call
    separate = paired_linear(inputs, first, second)  # with autograd: each layer on its own
    assert calls == ["default"] and separate[0].grad_fn is not None
    torch.testing.assert_close(separate[0].detach(), paired[0])


def test_fused_kernels_only_where_they_compute_the_same(monkeypatch):
    layer = FusedLinear(8, 4)
    inputs = torch.randn(2, 8)
    with torch.no_grad():
        assert onednn_applies(inputs, layer.weight)
        assert not onednn_applies(inputs.double(), layer.weight.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not onednn_applies(inputs, layer.weight)
    # autograd: the weights need gradients
    assert not onednn_applies(inputs, layer.weight)
    calls = counted_kernel_calls(monkeypatch)
    output = layer(inputs)
    output.sum().backward()
    assert calls == [] and layer.weight.grad is not None
    with torch.inference_mode():
        layer(inputs)
    assert calls == ["default"]


def tiny_model() -> SemaskForSemanticSegmentation:
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs()))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_model_inference_on_fused_kernels_matches_blas(monkeypatch, attention):
    model = tiny_model()
    model.set_attn_implementation(attention)
    pixel_values = torch.randn(2, 3, 45, 61)
    with torch.inference_mode():
        calls = counted_kernel_calls(monkeypatch)
        fused = model(pixel_values)
        monkeypatch.setattr(fused_kernels, "onednn_applies", lambda *args: False)
        reference = model(pixel_values)
    # every Swin block adds its MLP as a fused residual; semantic blocks add their gated output the same way (in SDPA
    # mode one image at a time)
    swin_blocks, semantic_blocks = sum(model.config.depths), sum(model.config.num_semantic_blocks)
    images_apart = len(pixel_values) if attention == "sdpa" else 1
    assert calls.count("binary") == swin_blocks + images_apart * semantic_blocks
    assert calls.count("default") > 4 * swin_blocks
    torch.testing.assert_close(fused.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.semantic_logits, reference.semantic_logits, atol=1e-5, rtol=1e-5)


def test_linear_layers_keep_their_names_and_weights():
    model = tiny_model()
    state = model.state_dict()
    block = model.semask.encoder.layers[0].blocks[0]
    for layer in (block.attention.q_proj, block.attention.o_proj, block.mlp.fc1, block.mlp.fc2):
        assert type(layer) is FusedLinear
    assert "semask.encoder.layers.0.blocks.0.mlp.fc1.weight" in state
    reloaded = SemaskForSemanticSegmentation(model.config).eval()
    reloaded.load_state_dict(state)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)


def randomized_conv_module(in_channels: int = 6, out_channels: int = 5) -> FusedConvModule:
    torch.manual_seed(0)
    module = FusedConvModule(in_channels, out_channels, 3, padding=1)
    with torch.no_grad():
        norm = module.batch_norm
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    return module.eval()


def counted_convolution_calls(monkeypatch) -> list[str]:
    calls = []
    kernel = torch.ops.mkldnn._convolution_pointwise.default

    def recording(*args):
        calls.append("convolution")
        return kernel(*args)

    monkeypatch.setattr(fused_kernels.torch.ops.mkldnn, "_convolution_pointwise", recording)
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_conv_module_matches_conv_bn_relu(monkeypatch, channels_last):
    module = randomized_conv_module()
    inputs = torch.randn(2, 6, 11, 9)
    if channels_last:
        inputs = inputs.to(memory_format=torch.channels_last)
    conv, norm = module.conv, module.batch_norm
    with torch.inference_mode():
        calls = counted_convolution_calls(monkeypatch)
        folded = module(inputs)
        expected = F.relu(norm(conv(inputs)))
    assert calls == ["convolution"]
    assert (folded >= 0).all() and (folded == 0).any()
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)


def test_folded_conv_module_only_in_eval_without_autograd(monkeypatch):
    module = randomized_conv_module()
    inputs = torch.randn(2, 6, 8, 8)
    calls = counted_convolution_calls(monkeypatch)
    module(inputs).sum().backward()  # eval mode, but the weights need gradients
    assert module.conv.weight.grad is not None
    with torch.no_grad():
        module.double()(inputs.double())  # not float32
        module.float().train()
        running_mean = module.batch_norm.running_mean.clone()
        module(inputs)  # training: batch statistics, which are then tracked
    assert not torch.equal(module.batch_norm.running_mean, running_mean)
    assert calls == []
