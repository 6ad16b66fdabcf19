"""SeMask-Mask2Former: config, padding, targets, losses and training, the missing-scipy hint, inference helpers."""

import pytest
import torch
import torch.nn.functional as F

import semask.modeling_semask_mask2former as modeling
from conftest import tiny_mask2former_config_kwargs, train_steps
from semask import SemaskConfig, SemaskMask2FormerConfig, SemaskMask2FormerForUniversalSegmentation
from semask.inference import class_scores, is_mask_classification, semantic_inference
from semask.modeling_semask_mask_classification import mask_classification_targets, semantic_head
from semask.presets import ADE20K_LABELS, mask2former_semantic_attention


@pytest.fixture(scope="module")
def tiny_model() -> SemaskMask2FormerForUniversalSegmentation:
    torch.manual_seed(0)
    return SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs())).eval()


def test_encoder_shares_the_label_set_and_follows_the_original_rule():
    config = SemaskMask2FormerConfig(id2label=dict(enumerate(ADE20K_LABELS)))
    assert config.backbone_config.num_labels == config.num_labels == 150
    assert list(config.backbone_config.semantic_attention) == ["windowed"] * 3 + ["global"]
    assert mask2former_semantic_attention(19) == ("windowed",) * 4
    # labels come from the encoder config when the top level names none, and the top level wins otherwise
    encoder = SemaskConfig(id2label={0: "a", 1: "b", 2: "c"})
    assert SemaskMask2FormerConfig(backbone_config=encoder).id2label == {0: "a", 1: "b", 2: "c"}
    config = SemaskMask2FormerConfig(backbone_config=encoder.to_dict(), id2label={0: "x", 1: "y"})
    assert type(config.backbone_config) is SemaskConfig and config.backbone_config.id2label == {0: "x", 1: "y"}
    reloaded = SemaskMask2FormerConfig.from_dict(config.to_dict())
    assert reloaded.backbone_config.to_dict() == config.backbone_config.to_dict()
    reloaded.num_labels = 3
    assert reloaded.backbone_config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_presets_hold_the_released_settings():
    ade = SemaskMask2FormerConfig.from_preset("semask-large-mask2former-ade20k")
    cityscapes = SemaskMask2FormerConfig.from_preset("semask-large-mask2former-cityscapes")
    assert (ade.backbone_config.embed_dim, list(ade.backbone_config.depths)) == (192, [2, 2, 18, 2])
    assert (ade.backbone_config.window_size, ade.backbone_config.semantic_window_size) == (12, 12)
    assert (cityscapes.backbone_config.window_size, cityscapes.backbone_config.semantic_window_size) == (12, 7)
    assert list(ade.backbone_config.semantic_attention) == ["windowed"] * 3 + ["global"]
    assert list(cityscapes.backbone_config.semantic_attention) == ["windowed"] * 4
    assert (ade.num_labels, cityscapes.num_labels) == (150, 19)
    settings = ("feature_size", "hidden_dim", "num_queries", "encoder_layers", "encoder_feedforward_dim")
    assert [getattr(ade, key) for key in settings] == [256, 256, 100, 6, 1024]
    assert (ade.decoder_layers, ade.dim_feedforward, ade.num_attention_heads) == (10, 2048, 8)
    assert (ade.class_weight, ade.mask_weight, ade.dice_weight, ade.semantic_loss_weight) == (2.0, 5.0, 5.0, 0.4)
    assert ade.train_num_points == 12544 and ade.size_divisibility == 32
    overridden = SemaskMask2FormerConfig.from_preset(
        "semask-large-mask2former-ade20k", backbone_config={"depths": [2] * 4}
    )
    assert list(overridden.backbone_config.depths) == [2] * 4 and overridden.backbone_config.embed_dim == 192


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {
                "backbone_config": {
                    "depths": (2, 2, 2),
                    "num_heads": (1, 2, 4),
                    "num_semantic_blocks": (1, 1, 1),
                    "semantic_attention": ["windowed"] * 3,
                }
            },
            "needs 4 encoder stages",
        ),
        ({"size_divisibility": 30}, "multiple of the patch size"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(Exception, match=message):
        SemaskMask2FormerConfig(**kwargs)


def test_images_are_padded_with_zeros_to_the_size_divisibility(tiny_model):
    pixel_values = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        outputs = tiny_model(pixel_values)
        padded = tiny_model(F.pad(pixel_values, (0, 96 - 70, 0, 64 - 45)))
    assert outputs.masks_queries_logits.shape == (2, 6, 16, 24)
    assert outputs.class_queries_logits.shape == (2, 6, 6)  # 5 classes + no-object
    assert outputs.semantic_logits.shape == (2, 5, 64, 96)
    assert [prior.shape[-2:] for prior in outputs.semantic_priors] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    torch.testing.assert_close(outputs.masks_queries_logits, padded.masks_queries_logits, rtol=0, atol=0)
    torch.testing.assert_close(outputs.semantic_logits, padded.semantic_logits, rtol=0, atol=0)


def test_semantic_head_upsamples_and_sums_every_stage():
    # bilinear resizing keeps constant maps constant: the head adds the four constants, at 4x stage 1's size
    priors = tuple(torch.full((1, 3, 8 // 2**index, 10 // 2**index), float(index + 1)) for index in range(3))
    priors += (torch.full((1, 3, 1, 2), 4.0),)  # odd sizes are resized to stage 1's after the x2 steps
    logits = semantic_head(priors, stride=4)
    assert logits.shape == (1, 3, 32, 40)
    torch.testing.assert_close(logits, torch.full_like(logits, 10.0))


def test_label_maps_become_sorted_class_masks_without_ignored_pixels():
    labels = torch.tensor([[[3, 3, 255], [1, 3, 1]], [[255, 255, 255], [255, 255, 255]]])
    mask_labels, class_labels = mask_classification_targets(labels)
    assert class_labels[0].tolist() == [1, 3] and class_labels[1].tolist() == []
    assert mask_labels[0].tolist() == [[[0, 0, 0], [1, 0, 1]], [[1, 1, 0], [0, 1, 0]]]
    assert mask_labels[0].dtype == torch.float32 and mask_labels[1].shape == (0, 2, 3)


def test_labels_give_the_same_mask_losses_as_explicit_targets_plus_the_semantic_loss(tiny_model):
    torch.manual_seed(1)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    labels[:, :, :5] = 255
    mask_labels, class_labels = mask_classification_targets(labels)
    with torch.no_grad():
        torch.manual_seed(0)
        from_labels = tiny_model(pixel_values, labels=labels)
        torch.manual_seed(0)
        explicit = tiny_model(pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    semantic = tiny_model.config.semantic_loss_weight * F.cross_entropy(
        from_labels.semantic_logits, labels, ignore_index=255
    )
    torch.testing.assert_close(from_labels.loss, explicit.loss + semantic)


def test_tiny_model_trains_on_label_maps():
    torch.manual_seed(0)
    model = SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()))
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.full((2, 64, 64), 1)
    labels[0, :, 32:], labels[1, 20:40, 10:50], labels[:, :4] = 3, 4, 255  # two classes per image, some ignored
    losses = train_steps(model, pixel_values, labels, steps=10)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], losses


def test_activation_checkpointing_and_auxiliary_losses():
    torch.manual_seed(0)
    model = SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()))
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 5, (1, 64, 64))

    def loss_and_gradients():
        model.zero_grad()
        torch.manual_seed(0)  # the same point sampling (and drop path) in both runs
        loss = model(pixel_values, labels=labels).loss
        loss.backward()
        return loss, [parameter.grad.clone() for parameter in model.parameters()]

    loss, gradients = loss_and_gradients()
    model.activation_checkpointing_enable()
    checkpointed = {
        cls.__name__
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", 0)
        for cls in type(module).__mro__
    }
    assert {"SemaskSwinLayer", "SemaskSemanticLayer", "Mask2FormerMaskedAttentionDecoderLayer"} <= checkpointed
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    torch.testing.assert_close(checkpointed_loss, loss)
    torch.testing.assert_close(checkpointed_gradients, gradients)
    model.config.use_auxiliary_loss = False  # only the final prediction (and the semantic head) is supervised
    with torch.no_grad():
        torch.manual_seed(0)
        assert model(pixel_values, labels=labels).loss < 0.6 * loss


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ({"labels": torch.zeros(1, 30, 30, dtype=torch.long)}, "pass label maps at the size of `pixel_values`"),
        ({"labels": torch.full((1, 32, 32), 7)}, r"Labels must lie in \[0, 5\)"),
        ({"mask_labels": [torch.zeros(1, 32, 32)]}, "together"),
        ({"mask_labels": [torch.zeros(2, 32, 32)], "class_labels": [torch.tensor([1])]}, "one class per mask"),
    ],
)
def test_bad_targets_are_refused(tiny_model, targets, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.randn(1, 3, 32, 32), **targets)


def test_missing_scipy_only_blocks_the_loss_with_an_install_hint(tiny_model, monkeypatch, tmp_path):
    tiny_model.save_pretrained(tmp_path)  # with scipy: the loss buffer is saved too
    monkeypatch.setattr(modeling, "is_scipy_available", lambda: False)
    model = SemaskMask2FormerForUniversalSegmentation.from_pretrained(tmp_path)
    assert model.criterion is None
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values).class_queries_logits, tiny_model(pixel_values).class_queries_logits
        )
        with pytest.raises(ImportError, match="needs scipy.*pip install scipy"):
            model(pixel_values, labels=torch.zeros(1, 64, 64, dtype=torch.long))


def test_semantic_inference_scores_classes_over_the_cropped_input(tiny_model):
    with torch.no_grad():
        outputs = tiny_model(torch.randn(1, 3, 45, 70))
    scores = class_scores(outputs, (45, 70))
    masks = F.interpolate(outputs.masks_queries_logits, size=(64, 96), mode="bilinear")[..., :45, :70].sigmoid()
    probabilities = outputs.class_queries_logits.softmax(-1)[..., :-1]
    expected = (probabilities[0, :, :, None, None] * masks[0, :, None]).sum(0)
    torch.testing.assert_close(scores[0], expected)
    torch.testing.assert_close(
        semantic_inference(outputs.class_queries_logits, outputs.masks_queries_logits, (20, 30)), scores[..., :20, :30]
    )
    assert is_mask_classification(tiny_model) and not is_mask_classification(torch.nn.Linear(1, 1))


def test_output_attentions_are_returned_and_unknown_arguments_refused(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs = tiny_model(pixel_values, output_attentions=True)
        assert tiny_model(pixel_values).attentions is None
    # one attention map per masked-attention decoder layer: (batch, heads, queries, keys)
    assert len(outputs.attentions) == tiny_model.config.decoder_layers - 1
    config = tiny_model.config
    assert outputs.attentions[0].shape[:3] == (1, config.num_attention_heads, config.num_queries)
    with pytest.raises(TypeError, match=r"does not use: \['output_semantic_attentions'\]"):
        tiny_model(pixel_values, output_semantic_attentions=True)
    with pytest.raises(TypeError, match=r"does not use: \['pixel_mask'\]"):
        tiny_model.model(pixel_values, pixel_mask=torch.ones(1, 64, 64))
