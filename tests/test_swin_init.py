"""Building SeMask from ImageNet Swin weights saved in transformers format."""

import logging

import pytest
import torch
from transformers import SwinBackbone, SwinConfig, SwinForImageClassification

from semask import SemaskBackbone, SemaskForSemanticSegmentation, SemaskModel

SWIN_KWARGS = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 4, "mlp_ratio": 2.0}
LABELS = {0: "background", 1: "road", 2: "car"}


@pytest.fixture(scope="module")
def swin_classifier_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = SwinForImageClassification(SwinConfig(image_size=64, num_labels=7, **SWIN_KWARGS))
    folder = tmp_path_factory.mktemp("swin") / "swin-classifier"
    model.save_pretrained(folder)
    return model, folder


def test_swin_weights_load_and_new_layers_are_reported(swin_classifier_folder, caplog):
    swin, folder = swin_classifier_folder
    with caplog.at_level(logging.WARNING):
        model, info = SemaskForSemanticSegmentation.from_swin_pretrained(
            str(folder), output_loading_info=True, id2label=LABELS
        )
    encoder_weights = {k: v for k, v in swin.swin.state_dict().items() if k.startswith(("embeddings", "encoder"))}
    semask_weights = model.semask.state_dict()
    assert len(encoder_weights) > 50
    for key, value in encoder_weights.items():
        torch.testing.assert_close(semask_weights[key], value, msg=key)

    assert info["unexpected_keys"] == ["layernorm.weight", "layernorm.bias"]
    missing = info["missing_keys"]
    assert all("semantic_layer" in k or "hidden_states_norms" in k or k.startswith("decode_head.") for k in missing)
    assert any(k.startswith("decode_head.classifier") for k in missing)
    assert "semask.encoder.layers.3.semantic_layer.blocks.0.gamma" in missing
    assert "encoder.layers.*.semantic_layer.blocks.*.q_proj.weight" in caplog.text
    assert "Unused checkpoint weights: layernorm.bias, layernorm.weight" in caplog.text

    assert model.config.num_labels == 3 and model.config.window_size == model.config.semantic_window_size == 4
    assert list(model.config.semantic_attention) == ["windowed"] * 4  # the original rule: embed_dim 16
    model.train()
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    model(pixel_values, labels=labels).loss.backward()


def test_swin_backbone_folder_and_other_semask_classes(tmp_path):
    torch.manual_seed(1)
    backbone = SwinBackbone(SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **SWIN_KWARGS))
    backbone.save_pretrained(tmp_path / "swin-backbone")
    encoder = SemaskModel.from_swin_pretrained(str(tmp_path / "swin-backbone"), id2label=LABELS)
    torch.testing.assert_close(
        encoder.embeddings.patch_embeddings.projection.weight,
        backbone.swin.embeddings.patch_embeddings.projection.weight,
    )
    semask_backbone = SemaskBackbone.from_swin_pretrained(str(tmp_path / "swin-backbone"), id2label=LABELS)
    assert semask_backbone.channels == [16, 32, 64, 128]


def test_settings_that_contradict_the_swin_weights_are_refused(swin_classifier_folder):
    _, folder = swin_classifier_folder
    with pytest.raises(ValueError, match="contradict the Swin checkpoint's architecture"):
        SemaskForSemanticSegmentation.from_swin_pretrained(str(folder), id2label=LABELS, embed_dim=32)
    # equal values given as lists are not contradictions
    SemaskForSemanticSegmentation.from_swin_pretrained(str(folder), id2label=LABELS, depths=[2, 2, 2, 2])


def test_non_swin_checkpoint_is_refused(tmp_path):
    from semask import SemaskConfig

    SemaskModel(SemaskConfig(embed_dim=16, num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Expected a Swin checkpoint, got model_type 'semask'"):
        SemaskForSemanticSegmentation.from_swin_pretrained(str(tmp_path), id2label=LABELS)
