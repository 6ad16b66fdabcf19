"""Model behaviour on tiny configurations: shapes, attention paths, gradients, outputs and input checks."""

import logging

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError

from conftest import tiny_config_kwargs, train_steps
from semask import SemaskConfig, SemaskForSemanticSegmentation, SemaskModel
from semask.modeling_semask import sum_of_upsampled_priors


def tiny_model(seed: int = 0, **overrides) -> SemaskForSemanticSegmentation:
    """A tiny SeMask with non-zero semantic gates, so the semantic layers change the features."""
    torch.manual_seed(seed)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs(**overrides)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (29, 130)])
def test_any_input_size_and_batch(size):
    model = tiny_model().eval()
    pixel_values = torch.randn(3, 3, *size)
    with torch.no_grad():
        outputs = model(pixel_values)
    stride4 = (-(-size[0] // 4), -(-size[1] // 4))
    assert outputs.logits.shape == (3, 5, *stride4)
    assert outputs.semantic_logits.shape == (3, 5, *stride4)
    expected = stride4
    for prior in outputs.semantic_priors:
        assert prior.shape == (3, 5, *expected)
        expected = ((expected[0] + 1) // 2, (expected[1] + 1) // 2)
    assert torch.isfinite(outputs.logits).all()
    # samples in a batch are independent
    with torch.no_grad():
        single = model(pixel_values[1:2]).logits
    torch.testing.assert_close(single, outputs.logits[1:2], atol=1e-5, rtol=1e-5)


def test_encoder_outputs(caplog):
    model = SemaskModel(SemaskConfig(**tiny_config_kwargs())).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        outputs = model(
            torch.randn(2, 3, 40, 56),
            output_hidden_states=True,
            output_attentions=True,
            output_semantic_attentions=True,
        )
    assert [tuple(f.shape) for f in outputs.feature_maps] == [
        (2, 16, 10, 14),
        (2, 32, 5, 7),
        (2, 64, 3, 4),
        (2, 128, 2, 2),
    ]
    assert [tuple(p.shape[1:2]) for p in outputs.semantic_priors] == [(5,)] * 4
    assert outputs.last_hidden_state.shape == (2, 4, 128)
    torch.testing.assert_close(outputs.last_hidden_state.transpose(1, 2).reshape(2, 128, 2, 2), outputs.feature_maps[3])
    assert [tuple(h.shape) for h in outputs.hidden_states] == [
        (2, 140, 16),
        (2, 140, 16),
        (2, 35, 32),
        (2, 12, 64),
        (2, 4, 128),
    ]
    assert len(outputs.attentions) == 8  # every Swin block
    assert outputs.attentions[0].shape == (2 * 3 * 4, 1, 16, 16)  # 10x14 padded to 12x16 in 4x4 windows
    assert len(outputs.semantic_attentions) == 4
    assert outputs.semantic_attentions[3].shape == (2, 1, 4, 4)  # global in the last stage
    torch.testing.assert_close(outputs.semantic_attentions[0].sum(-1), torch.ones(2 * 3 * 4, 1, 16))

    model.set_attn_implementation("sdpa")
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once: make the warning observable here
    with caplog.at_level(logging.WARNING):
        sdpa = model(torch.randn(2, 3, 40, 56), output_attentions=True)
    assert sdpa.attentions == () and "only returned with eager attention" in caplog.text

    plain = model(torch.randn(2, 3, 40, 56))
    assert plain.hidden_states is None and plain.attentions is None
    as_tuple = model(torch.randn(2, 3, 40, 56), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3


def test_eager_and_sdpa_agree():
    model = tiny_model().eval()
    pixel_values = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(pixel_values)
        model.set_attn_implementation("sdpa")
        sdpa = model(pixel_values)
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager.semantic_logits, sdpa.semantic_logits, atol=1e-5, rtol=1e-5)


def test_semantic_layer_changes_features_and_zero_gamma_reduces_to_layernorm():
    """With gamma = 0 the semantic layer returns LayerNorm(x) exactly; with gamma != 0 it does not."""
    model = tiny_model().eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with_semantics = model.semask(pixel_values).feature_maps[-1]
        for stage in model.semask.encoder.layers:
            for block in stage.semantic_layer.blocks:
                block.gamma.zero_()
        without = model.semask(pixel_values).feature_maps[-1]
        captured = {}
        layer = model.semask.encoder.layers[0].semantic_layer
        handle = layer.register_forward_hook(lambda module, args, output: captured.update(args=args, output=output))
        model(pixel_values)
        handle.remove()
    assert (with_semantics - without).abs().max() > 0.1
    torch.testing.assert_close(captured["output"][0], layer.layernorm(captured["args"][0]))


def test_gradient_checkpointing_reaches_every_parameter():
    model = tiny_model()
    model.activation_checkpointing_enable()
    model.train()
    pixel_values = torch.randn(2, 3, 36, 44)
    labels = torch.randint(0, 5, (2, 36, 44))
    labels[:, :4] = 255
    loss = model(pixel_values, labels=labels).loss
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    gammas = [p.grad for name, p in model.named_parameters() if name.endswith("gamma")]
    assert len(gammas) == 4 and all(torch.isfinite(g).all() for g in gammas)

    # checkpointing recomputes the same values: loss and gradients equal those without it (no randomness)
    deterministic = {"drop_path_rate": 0.0, "semantic_dropout_prob": 0.0, "classifier_dropout_prob": 0.0}
    reference, checkpointed = tiny_model(**deterministic).train(), tiny_model(**deterministic)
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    reference_loss = reference(pixel_values, labels=labels).loss
    checkpointed_loss = checkpointed(pixel_values, labels=labels).loss
    torch.testing.assert_close(checkpointed_loss, reference_loss)
    reference_loss.backward()
    checkpointed_loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        torch.testing.assert_close(parameter.grad, reference_grads[name].grad, atol=1e-5, rtol=1e-4)


def test_loss_goes_down_when_training():
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = (pixel_values[:, 0] > 0).long()  # learnable: class from the sign of the first channel
    losses = train_steps(tiny_model(), pixel_values, labels, steps=30)
    assert losses[-1] < 0.65 * losses[0]  # reaches about 0.53 here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_finite_and_semantic_softmax_runs_in_float32(dtype):
    model = tiny_model().eval()
    captured = []
    attention = model.semask.encoder.layers[2].semantic_layer.blocks[0]
    handle = attention.register_forward_hook(lambda module, args, output: captured.append(output))
    # large activations: unscaled q kᵀ overflows half precision unless the softmax runs in float32
    pixel_values = 50 * torch.randn(1, 3, 32, 32)
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            outputs = model(pixel_values, output_semantic_attentions=True)
        assert torch.isfinite(outputs.logits).all() and torch.isfinite(outputs.semantic_logits).all()
    handle.remove()
    assert captured[0][2].dtype == torch.float32  # eager attention weights: computed in float32


def test_plain_swin_fpn_without_semantic_layers():
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs(num_semantic_blocks=(0, 0, 0, 0))))
    labels = torch.randint(0, 5, (2, 32, 32))
    outputs = model(torch.randn(2, 3, 32, 32), labels=labels)
    assert outputs.semantic_logits is None and outputs.semantic_priors is None
    torch.testing.assert_close(outputs.loss, model.decode_loss(outputs.logits, labels))
    assert not any("semantic_layer" in name for name, _ in model.named_parameters())


def test_loss_matches_manual_computation():
    model = tiny_model().eval()
    pixel_values = torch.randn(2, 3, 30, 34)
    labels = torch.randint(0, 5, (2, 30, 34))
    labels[0, :10] = 255
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)

    def cross_entropy(logits, reduction):
        upsampled = F.interpolate(logits, size=(30, 34), mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(upsampled, labels, ignore_index=255, reduction="none")
        return per_pixel.sum() / (labels.numel() if reduction == "all" else (labels != 255).sum())

    expected = cross_entropy(outputs.logits, "all") + 0.4 * cross_entropy(outputs.semantic_logits, "all")
    torch.testing.assert_close(outputs.loss, expected)
    model.config.loss_reduction = "valid_pixels"
    with torch.no_grad():
        valid = model(pixel_values, labels=labels).loss
    expected = cross_entropy(outputs.logits, "valid") + 0.4 * cross_entropy(outputs.semantic_logits, "valid")
    torch.testing.assert_close(valid, expected)


def test_wrong_channel_count_is_rejected():
    model = tiny_model().eval()
    with pytest.raises(
        ValueError, match=r"Expected pixel_values of shape \(batch_size, 3, height, width\), got \(1, 4, 32, 32\)"
    ):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="got \\(3, 32, 32\\)"):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.full((1, 32, 32), 5), r"\[0, 5\).*found \[5\]"),
        (torch.full((1, 32, 32), -1), r"found \[-1\]"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.long), r"shape \(1, height, width\)"),
        (torch.zeros(1, 32, 32), "integer labels"),
        (torch.zeros(2, 32, 32, dtype=torch.long), r"shape \(1, height, width\)"),
    ],
)
def test_bad_labels_are_rejected(labels, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 32, 32), labels=labels)


def test_ignore_index_labels_are_accepted():
    model = tiny_model()
    labels = torch.full((2, 32, 32), 255)
    labels[0, 0, 0] = 4
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32), labels=labels).loss)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"semantic_attention": ("windowed",) * 3}, "one value per stage"),
        ({"semantic_attention": ("windowed", "windowed", "shifted", "global")}, "'windowed', 'global'"),
        ({"num_semantic_blocks": (1, 0, 1, 1)}, "every stage"),
        ({"loss_reduction": "sum"}, "loss_reduction"),
        ({"num_heads": (5, 6, 12, 24)}, "not divisible"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        SemaskConfig(**kwargs)


# halving stage sizes; maps before the last upsample of one size but twice it is not the first size; other sizes
@pytest.mark.parametrize("size", [(64, 96), (60, 60), (36, 52)])
@pytest.mark.parametrize("grad", [False, True])
def test_fpn_sum_equals_the_sum_of_each_scale_head(size, grad):
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    with torch.no_grad():
        feature_maps = model.semask(torch.randn(2, 3, *size)).feature_maps
    head = model.decode_head
    with torch.set_grad_enabled(grad):
        fused = head._fpn_sum(feature_maps)
        # the original: every scale head in full (its upsamples included), each resized to the first size, summed
        outputs = [scale_head(x) for scale_head, x in zip(head.scale_heads, feature_maps)]
        size0 = outputs[0].shape[-2:]
        expected = sum(F.interpolate(x, size=size0, mode="bilinear", align_corners=False) for x in outputs)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    assert fused.requires_grad == grad


@pytest.mark.parametrize("size", [(64, 96), (36, 52)])  # halving stage sizes, and sizes that do not halve
def test_semantic_branch_equals_the_sum_of_upsampled_priors(size):
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    with torch.no_grad():
        priors = model.semask(torch.randn(2, 3, *size)).semantic_priors
        semantic_logits = sum_of_upsampled_priors(priors, align_corners=False)
    upsampled = []
    for index, prior in enumerate(priors):  # the original: each prior upsampled x2 `index` times, then summed
        for _ in range(index):
            prior = F.interpolate(prior, scale_factor=2, mode="bilinear", align_corners=False)
        upsampled.append(F.interpolate(prior, size=priors[0].shape[-2:], mode="bilinear", align_corners=False))
    torch.testing.assert_close(semantic_logits, sum(upsampled), atol=1e-5, rtol=1e-5)
