"""SemaskConfig: presets of the released models, serialisation and backbone outputs."""

import pytest
import torch

from semask import SemaskConfig, SemaskForSemanticSegmentation
from semask.presets import fpn_semantic_attention

DATASETS = ("ade20k", "cityscapes", "coco-stuff10k")
# Parameter counts (millions) in the original README, per Swin size, for the datasets in DATASETS' order.
RELEASED_PARAMS = {"tiny": (35, 34, 35), "small": (56, 56, 56), "base": (96, 96, 96), "large": (211, 211, 211)}
NUM_LABELS = {"ade20k": 150, "cityscapes": 19, "coco-stuff10k": 171}
FIRST_LABEL = {"ade20k": "wall", "cityscapes": "road", "coco-stuff10k": "person"}


def test_twelve_released_fpn_presets():
    assert set(SemaskConfig.preset_names) == {f"semask-{s}-fpn-{d}" for s in RELEASED_PARAMS for d in DATASETS}


@pytest.mark.parametrize("size", list(RELEASED_PARAMS))
@pytest.mark.parametrize("dataset", DATASETS)
def test_preset_matches_the_released_model(size, dataset):
    config = SemaskConfig.from_preset(f"semask-{size}-fpn-{dataset}")
    assert config.num_labels == NUM_LABELS[dataset] and config.id2label[0] == FIRST_LABEL[dataset]
    assert len(set(config.id2label.values())) == config.num_labels
    assert config.semantic_window_size == config.window_size == (7 if size in ("tiny", "small") else 12)
    global_stages = config.embed_dim in (96, 192) and dataset != "cityscapes"
    assert list(config.semantic_attention) == ["windowed"] * 2 + ["global" if global_stages else "windowed"] * 2
    assert config.drop_path_rate == 0.3 and config.decoder_hidden_size == 256 and config.semantic_loss_weight == 0.4
    with torch.device("meta"):
        model = SemaskForSemanticSegmentation(config)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - RELEASED_PARAMS[size][DATASETS.index(dataset)]) < 1.0, millions


def test_fpn_rule():
    assert fpn_semantic_attention(96, 150) == ("windowed", "windowed", "global", "global")
    assert fpn_semantic_attention(192, 20) == ("windowed", "windowed", "global", "global")
    assert fpn_semantic_attention(96, 19) == ("windowed",) * 4
    assert fpn_semantic_attention(128, 150) == ("windowed",) * 4


def test_overrides_and_round_trip(tmp_path):
    config = SemaskConfig.from_preset("semask-tiny-fpn-cityscapes", loss_reduction="valid_pixels", out_indices=[2, 4])
    assert config.out_features == ["stage2", "stage4"]
    config.save_pretrained(tmp_path)
    reloaded = SemaskConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.id2label[18] == "bicycle" and reloaded.label2id["bicycle"] == 18
    assert SemaskConfig().out_features == ["stage1", "stage2", "stage3", "stage4"]


def test_unknown_preset():
    with pytest.raises(
        ValueError, match="Unknown SeMask preset 'semask-huge-fpn-ade20k'; expected one of: semask-tiny"
    ):
        SemaskConfig.from_preset("semask-huge-fpn-ade20k")
