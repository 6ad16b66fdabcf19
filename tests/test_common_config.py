"""transformers' common config checks (`ConfigTester`) for `SemaskConfig`, `SemaskMask2FormerConfig` (each pixel
decoder) and `SemaskMaskFormerConfig`, plus the label set the composite configs share with their encoder.

Which of `ConfigTester`'s checks apply: `APPLIED` (the check -> the tests here) and `NOT_APPLIED` (-> why not).
"""

import json

import pytest
import torch
from common_checks import assert_check_table, config_dict
from transformers import AutoConfig, DetrConfig, PreTrainedConfig

from conftest import tiny_config_kwargs, tiny_mask2former_config_kwargs, tiny_maskformer_config_kwargs
from semask import SemaskConfig, SemaskMask2FormerConfig, SemaskMaskFormerConfig

CONFIGS = {
    "semask": (SemaskConfig, tiny_config_kwargs),
    "mask2former": (SemaskMask2FormerConfig, tiny_mask2former_config_kwargs),
    "mask2former-fapn": (
        SemaskMask2FormerConfig,
        lambda **kw: tiny_mask2former_config_kwargs(pixel_decoder="fapn", **kw),
    ),
    "mask2former-msfapn": (
        SemaskMask2FormerConfig,
        lambda **kw: tiny_mask2former_config_kwargs(pixel_decoder="msfapn", **kw),
    ),
    "maskformer": (SemaskMaskFormerConfig, tiny_maskformer_config_kwargs),
}
COMPOSITE = [name for name, (config_class, _) in CONFIGS.items() if config_class is not SemaskConfig]
# transformers' settings of every config, with values other than their defaults
COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["SemaskSomething"],
    "problem_type": "single_label_classification",
}

APPLIED = {
    "create_and_test_config_common_properties": "test_common_properties",
    "create_and_test_config_to_json_string": "test_to_json_string",
    "create_and_test_config_to_json_file": "test_to_json_file_and_dict_round_trips",
    "create_and_test_config_from_and_save_pretrained": "test_from_and_save_pretrained",
    "create_and_test_config_from_and_save_pretrained_subfolder": "test_from_and_save_pretrained",
    "create_and_test_config_from_and_save_pretrained_composite": "test_sub_configs_load_from_the_composite_folder",
    "create_and_test_config_with_num_labels": ("test_num_labels", "test_composite_configs_share_the_label_set"),
    "check_config_can_be_init_without_params": "test_init_without_params",
    "check_config_arguments_init": "test_common_kwargs",
    "to_dict / from_dict (return_unused_kwargs, overrides)": "test_to_json_file_and_dict_round_trips",
    "AutoConfig (model_type registered)": "test_auto_config",
}
NOT_APPLIED = {
    "has_text_modality (vocab_size)": "image models: no vocabulary",
    "test_config_rope_* / rope_parameters": "no rotary position embeddings",
}


def build(name: str, **overrides) -> PreTrainedConfig:
    config_class, kwargs = CONFIGS[name]
    return config_class(**kwargs(**overrides))


@pytest.mark.parametrize("name", CONFIGS)
def test_common_properties(name):
    """`hidden_size`, `num_attention_heads` and `num_hidden_layers` exist (transformers' names, through
    `attribute_map` where the config names them otherwise)."""
    config = build(name)
    for attribute in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        assert getattr(config, attribute) is not None, attribute
    if isinstance(config, SemaskConfig):
        assert config.hidden_size == config.embed_dim * 2 ** (len(config.depths) - 1)
        assert config.num_attention_heads == config.num_heads and config.num_hidden_layers == len(config.depths)
    elif isinstance(config, SemaskMask2FormerConfig):
        assert config.hidden_size == config.hidden_dim and config.num_hidden_layers == config.decoder_layers
    else:  # MaskFormer's names, as transformers' MaskFormerConfig defines them
        assert config.hidden_size == config.mask_feature_size
        assert config.num_hidden_layers == config.decoder_config.encoder_layers == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_to_json_string(name):
    config = build(name)
    saved = json.loads(config.to_json_string())
    assert saved["model_type"] == config.model_type and saved["id2label"]["0"] == "sky"
    for key, value in CONFIGS[name][1]().items():
        if key in ("backbone_config", "decoder_config"):
            assert all(
                saved[key][k] == (list(v) if isinstance(v, tuple) else v) for k, v in value.items() if k != "id2label"
            )
        elif key != "id2label":
            assert saved[key] == (list(value) if isinstance(value, tuple) else value), key
    assert type(config).from_dict(saved).to_dict() == config.to_dict()


@pytest.mark.parametrize("name", CONFIGS)
def test_to_json_file_and_dict_round_trips(name, tmp_path):
    config = build(name)
    config.to_json_file(tmp_path / "config.json")
    assert type(config).from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    reloaded, unused = type(config).from_dict({**config.to_dict(), "not_a_setting": 1}, return_unused_kwargs=True)
    assert unused == {} and reloaded.not_a_setting == 1  # kept as an attribute, as transformers does
    assert type(config).from_dict(config.to_dict(), output_hidden_states=True).output_hidden_states
    diff = config.to_diff_dict()
    assert (
        "model_type" in diff
        and type(config)(**{k: v for k, v in diff.items() if k != "model_type"}).to_dict() == config.to_dict()
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_from_and_save_pretrained(name, tmp_path):
    config = build(name)
    config.save_pretrained(tmp_path / "top")
    config.save_pretrained(tmp_path / "parent" / "sub")
    for reloaded in (
        type(config).from_pretrained(tmp_path / "top"),
        type(config).from_pretrained(tmp_path / "parent", subfolder="sub"),
    ):
        assert config_dict(reloaded) == config_dict(config)
    with pytest.raises(OSError):
        type(config).from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("name", COMPOSITE)
def test_sub_configs_load_from_the_composite_folder(name, tmp_path):
    """Each sub-config class loads its part of a saved composite config, and saves and loads it alone."""
    config = build(name)
    config.save_pretrained(tmp_path / "composite")
    expected_classes = {"backbone_config": SemaskConfig, "decoder_config": DetrConfig}
    assert set(config.sub_configs) <= set(expected_classes) and "backbone_config" in config.sub_configs
    for key, sub_class in config.sub_configs.items():
        assert sub_class is expected_classes[key] and isinstance(getattr(config, key), sub_class)
        loaded = sub_class.from_pretrained(tmp_path / "composite")
        settings = loaded.to_dict()
        settings.pop("transformers_version", None)
        assert settings == config.to_dict()[key]
        loaded.save_pretrained(tmp_path / key)
        assert sub_class.from_pretrained(tmp_path / key).to_dict() == loaded.to_dict()


@pytest.mark.parametrize("name", CONFIGS)
def test_num_labels(name):
    """`num_labels` sizes `id2label` and `label2id`, at init and when set; `id2label` alone gives `label2id`."""
    config_class, kwargs = CONFIGS[name]
    settings = {key: value for key, value in kwargs().items() if key != "id2label"}
    if "backbone_config" in settings:
        settings["backbone_config"] = {k: v for k, v in settings["backbone_config"].items() if k != "id2label"}
    config = config_class(**settings, num_labels=4)
    assert len(config.id2label) == len(config.label2id) == config.num_labels == 4
    config.num_labels = 3
    assert len(config.id2label) == len(config.label2id) == 3
    labeled = build(name)
    assert labeled.num_labels == 5 and labeled.label2id == {v: k for k, v in labeled.id2label.items()}


@pytest.mark.parametrize("name", COMPOSITE)
def test_composite_configs_share_the_label_set(name, tmp_path):
    """The encoder's semantic layers predict the decoder's classes: one label set, however it is set."""
    config = build(name)
    encoder = config.backbone_config
    assert (encoder.id2label, encoder.label2id) == (config.id2label, config.label2id) and encoder.label2id
    config.num_labels = 3
    assert encoder.num_labels == 3 and len(encoder.label2id) == 3
    config.save_pretrained(tmp_path)
    labels = {0: "a", 1: "b"}
    reloaded = type(config).from_pretrained(tmp_path, id2label=labels, label2id={"a": 0, "b": 1})
    assert reloaded.backbone_config.id2label == labels and reloaded.backbone_config.label2id == {"a": 0, "b": 1}
    # an encoder given with labels and none at the top: the encoder's labels, label2id included
    alone = type(config)(**{**CONFIGS[name][1](), "id2label": None, "backbone_config": SemaskConfig(id2label=labels)})
    assert alone.id2label == labels and alone.label2id == alone.backbone_config.label2id == {"a": 0, "b": 1}


@pytest.mark.parametrize("config_class", [SemaskConfig, SemaskMask2FormerConfig, SemaskMaskFormerConfig])
def test_init_without_params(config_class):
    """The defaults describe the released SeMask-T variant of each model, and validate."""
    config = config_class()
    config.validate()
    encoder = config if config_class is SemaskConfig else config.backbone_config
    assert (encoder.embed_dim, list(encoder.depths)) == (96, [2, 2, 6, 2])


@pytest.mark.parametrize("name", CONFIGS)
def test_common_kwargs(name):
    config = build(name, **COMMON_KWARGS)
    for key, value in COMMON_KWARGS.items():
        expected = torch.float16 if key == "dtype" else value
        assert getattr(config, key) == expected, key


@pytest.mark.parametrize("name", CONFIGS)
def test_auto_config(name, tmp_path):
    config = build(name)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and config_dict(loaded) == config_dict(config)
    assert type(AutoConfig.for_model(config.model_type)) is type(config)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoConfig"].endswith(type(config).__name__)


def test_check_table():
    assert_check_table(globals())
