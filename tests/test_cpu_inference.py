"""The CPU-inference fast path (`semask.cpu_inference`): the same results as the plain model files, taken by default
in CPU inference and nowhere else."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semask.cpu_inference as cpu_inference
from conftest import tiny_config_kwargs, tiny_mask2former_config_kwargs
from semask import (
    SemaskBackbone,
    SemaskConfig,
    SemaskForSemanticSegmentation,
    SemaskMask2FormerConfig,
    SemaskMask2FormerForUniversalSegmentation,
)
from semask.cpu_inference import (
    CpuConvModule,
    CpuLinear,
    CpuSemanticAttention,
    CpuSwinLayer,
    runs_cpu_inference,
    use_cpu_inference_kernels,
    use_plain_modules,
)
from semask.modeling_semask import SemaskSemanticAttention, SemaskSemanticLayer, SemaskSwinLayer

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def counted_kernel_calls(monkeypatch) -> list[str]:
    """Records each oneDNN linear and convolution call (by kind) while the test runs."""
    calls = []
    for overload in ("default", "binary"):
        kernel = getattr(torch.ops.mkldnn._linear_pointwise, overload)

        def recording(*args, _kernel=kernel, _name=overload):
            calls.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(cpu_inference.torch.ops.mkldnn._linear_pointwise, overload, recording)
    convolution = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(
        cpu_inference.torch.ops.mkldnn,
        "_convolution_pointwise",
        lambda *args: calls.append("convolution") or convolution(*args),
    )
    return calls


def with_gates(model: nn.Module) -> nn.Module:
    """`model` with non-zero semantic gates (a fresh model's are 0), in eval mode."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def tiny_model(**overrides) -> SemaskForSemanticSegmentation:
    torch.manual_seed(0)
    return with_gates(SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs(**overrides))))


def test_runs_cpu_inference_only_in_float32_cpu_inference():
    layer = nn.Linear(8, 4).eval()
    inputs = torch.randn(2, 8)
    assert not runs_cpu_inference(layer, inputs)  # autograd
    with torch.no_grad():
        assert runs_cpu_inference(layer, inputs)
        assert not runs_cpu_inference(layer, inputs.double())
        assert not runs_cpu_inference(layer.train(), inputs)
        layer.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not runs_cpu_inference(layer, inputs)
    with torch.inference_mode():
        assert runs_cpu_inference(layer, inputs)


def test_linear_and_conv_kernels_match_the_plain_layers(monkeypatch):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40)
    fast = use_cpu_inference_kernels(copy.deepcopy(plain)).eval()
    assert type(fast) is CpuLinear
    inputs = torch.randn(3, 49, 24)
    calls = counted_kernel_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(fast(inputs), plain(inputs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(inputs.transpose(0, 1)), plain(inputs).transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert calls == ["default", "default"]
    fast(inputs).sum().backward()  # autograd: the plain layer
    assert calls == ["default", "default"] and fast.weight.grad is not None


def randomized_conv_module() -> CpuConvModule:
    torch.manual_seed(0)
    module = CpuConvModule(6, 5, 3, padding=1)
    with torch.no_grad():
        norm = module.batch_norm
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    return module.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_conv_module_matches_conv_bn_relu_and_keeps_nan(monkeypatch, channels_last):
    module = randomized_conv_module()
    inputs = torch.randn(2, 6, 11, 9)
    inputs[0, :, 4, 4] = float("nan")
    if channels_last:
        inputs = inputs.to(memory_format=torch.channels_last)
    calls = counted_kernel_calls(monkeypatch)
    with torch.inference_mode():
        folded = module(inputs)
        expected = F.relu(module.batch_norm(module.conv(inputs)))
    assert calls == ["convolution"]
    assert (folded.nan_to_num(1) >= 0).all() and (folded == 0).any()
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(folded.isnan(), expected.isnan())


def test_folded_conv_module_only_in_eval_without_autograd(monkeypatch):
    module = randomized_conv_module()
    inputs = torch.randn(2, 6, 8, 8)
    calls = counted_kernel_calls(monkeypatch)
    module(inputs).sum().backward()  # eval mode, but autograd
    assert module.conv.weight.grad is not None
    with torch.no_grad():
        module.double()(inputs.double())  # not float32
        module.float().train()
        running_mean = module.batch_norm.running_mean.clone()
        module(inputs)  # training: batch statistics, which are then tracked
    assert not torch.equal(module.batch_norm.running_mean, running_mean)
    assert calls == []


def test_semantic_attention_block_matches_the_plain_block(monkeypatch):
    config = SemaskConfig(**tiny_config_kwargs())
    torch.manual_seed(0)
    plain = with_gates(SemaskSemanticAttention(config, 16))
    fast = use_cpu_inference_kernels(copy.deepcopy(plain))
    assert type(fast) is CpuSemanticAttention
    windows = torch.randn(6, 16, 16)
    calls = counted_kernel_calls(monkeypatch)
    with torch.no_grad():
        expected, fast_output = plain(windows), fast(windows)
    # one call for both class projections, one for the values, one for the gated residual
    assert calls == ["default", "default", "binary"]
    for actual, reference in zip(fast_output[:2], expected[:2]):
        torch.testing.assert_close(actual, reference, atol=1e-5, rtol=1e-5)


def model_families() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mask2former = SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()))
    return {
        "fpn": tiny_model(),
        "fpn-all-windowed": tiny_model(semantic_attention=("windowed",) * 4),
        "swin-fpn": tiny_model(num_semantic_blocks=(0, 0, 0, 0)),
        "backbone": with_gates(SemaskBackbone(SemaskConfig(**tiny_config_kwargs()))),
        "mask2former": with_gates(mask2former),
    }


def output_tensors(outputs) -> dict[str, torch.Tensor]:
    names = ("logits", "semantic_logits", "class_queries_logits", "masks_queries_logits", "feature_maps")
    tensors = {}
    for name in names:
        value = getattr(outputs, name, None)
        for index, tensor in enumerate(value if isinstance(value, tuple) else () if value is None else (value,)):
            tensors[f"{name}.{index}"] = tensor
    for index, prior in enumerate(outputs.get("semantic_priors") or ()):
        tensors[f"semantic_priors.{index}"] = prior
    return tensors


@pytest.mark.parametrize("family", ["fpn", "fpn-all-windowed", "swin-fpn", "backbone", "mask2former"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fast_path_equals_the_plain_path_on_every_model_family(monkeypatch, family, attention):
    model = model_families()[family]
    model.set_attn_implementation(attention)
    plain = use_plain_modules(copy.deepcopy(model))
    assert not any(type(module).__module__ == cpu_inference.__name__ for module in plain.modules())
    pixel_values = torch.randn(2, 3, 45, 61)  # padded windows, shifted and not, two images
    calls = counted_kernel_calls(monkeypatch)
    with torch.no_grad():
        expected = output_tensors(plain(pixel_values))
        assert calls == []
        actual = output_tensors(model(pixel_values))
    assert calls.count("binary") >= sum(model_config(model).depths)  # every Swin block adds its MLP fused
    assert actual.keys() == expected.keys() and actual
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


def model_config(model: nn.Module) -> SemaskConfig:
    return getattr(model.config, "backbone_config", None) or model.config


def test_a_loaded_model_takes_the_fast_path_in_cpu_inference_only(monkeypatch, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = SemaskForSemanticSegmentation.from_pretrained(tmp_path)
    assert not model.training
    block = model.semask.encoder.layers[0].blocks[0]
    assert type(block) is CpuSwinLayer and type(block.attention.q_proj) is CpuLinear
    assert isinstance(block, SemaskSwinLayer) and "blocks.0.mlp.fc1.weight" in str(list(model.state_dict()))
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    calls = counted_kernel_calls(monkeypatch)
    pixel_values = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        fast = model(pixel_values).logits
    assert calls and not sdpa_calls  # oneDNN kernels, and the window / semantic attention as matmuls
    calls[:] = []
    reference = model(pixel_values).logits  # autograd: transformers' SDPA and plain layers
    assert calls == [] and len(sdpa_calls) == sum(model.config.depths) + sum(model.config.num_semantic_blocks)
    torch.testing.assert_close(fast, reference.detach(), atol=1e-5, rtol=1e-5)
    reference.sum().backward()  # the in-place residual adds of inference leave autograd intact
    assert all(p.grad is not None for p in block.parameters())
    plain = use_plain_modules(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values).logits, fast, atol=1e-5, rtol=1e-5)
        model.train()(pixel_values)
    assert calls == []


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_semantic_layers_take_one_image_at_a_time_in_sdpa_inference(monkeypatch, attention):
    model = tiny_model()
    model.set_attn_implementation(attention)
    windows_seen = []
    forward = SemaskSemanticAttention.forward
    monkeypatch.setattr(
        SemaskSemanticAttention, "forward", lambda self, x: windows_seen.append(len(x)) or forward(self, x)
    )
    pixel_values = torch.randn(3, 3, 45, 61)
    reference = model(pixel_values)  # with autograd: the whole batch at once
    batch_calls, windows_seen[:] = list(windows_seen), []
    with torch.no_grad():
        outputs = model(pixel_values)
    stages = len(model.config.depths)
    assert len(batch_calls) == stages
    assert all(isinstance(layer.semantic_layer, SemaskSemanticLayer) for layer in model.semask.encoder.layers)
    if attention == "sdpa":
        assert [3 * seen for seen in windows_seen[::3]] == batch_calls and len(windows_seen) == 3 * stages
    else:
        assert windows_seen == batch_calls
    for name in ("logits", "semantic_logits"):
        torch.testing.assert_close(outputs[name], reference[name].detach(), atol=1e-5, rtol=1e-5)
