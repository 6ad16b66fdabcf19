"""SeMask-MiT: SegFormer's Mix Transformer with semantic attention blocks (encoder, heads, losses, config, presets and
initialisation from SegFormer checkpoints)."""

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import SegformerConfig, SegformerForImageClassification, SegformerForSemanticSegmentation

from conftest import tiny_mit_config_kwargs, train_steps
from semask import SemaskMitConfig, SemaskMitForSemanticSegmentation, SemaskMitModel
from semask.cpu_inference import use_plain_modules
from semask.presets import MIT_PRESET_NAMES, mit_processing, mit_semantic_attention

ARCH = {key: tiny_mit_config_kwargs()[key] for key in ("hidden_sizes", "depths", "num_attention_heads")}
LABELS = tiny_mit_config_kwargs()["id2label"]
# SegFormer's parameter counts (millions, ADE20K heads) in its paper, per MiT size.
SEGFORMER_PARAMS = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}


def mit_config(**overrides) -> SemaskMitConfig:
    """The tiny SeMask-MiT of `tiny_mit_config_kwargs`."""
    return SemaskMitConfig(**tiny_mit_config_kwargs(**overrides))


def set_gammas(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(value)


def max_difference(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


def learnable_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32x32 images whose 8x8 blocks are one class each, coloured by their class, plus noise."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 5, (2, 4, 4), generator=generator)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = torch.randn(5, 3, generator=generator)
    pixel_values = colours[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, 3, 32, 32, generator=generator)
    return pixel_values, labels


@pytest.fixture(scope="module")
def segformer() -> SegformerForSemanticSegmentation:
    """A random tiny SegFormer with the tiny SeMask-MiT's architecture and labels."""
    torch.manual_seed(0)
    config = SegformerConfig(**ARCH, decoder_hidden_size=16, id2label=LABELS)
    return SegformerForSemanticSegmentation(config).eval()


def test_with_zero_gammas_the_encoder_computes_segformers_feature_maps(segformer):
    torch.manual_seed(1)
    model = SemaskMitModel(mit_config()).eval()
    result = model.load_state_dict(segformer.segformer.state_dict(), strict=False)
    assert result.unexpected_keys == [] and len(result.missing_keys) == 4 * 9  # 4 blocks: gamma, 4 linear layers
    assert all(".semantic_layer.blocks." in key for key in result.missing_keys)
    pixel_values = torch.randn(2, 3, 45, 61)  # odd sizes: the windowed stages pad their maps
    with torch.no_grad():
        expected = segformer.segformer(pixel_values, output_hidden_states=True).hidden_states
        outputs = model(pixel_values, output_hidden_states=True)
    assert [tuple(m.shape) for m in outputs.feature_maps] == [
        (2, 8, 12, 16),
        (2, 16, 6, 8),
        (2, 24, 3, 4),
        (2, 32, 2, 2),
    ]
    assert max_difference(outputs.feature_maps, expected) <= 1e-6  # the CPU fast path (oneDNN linear layers)
    assert all(map(torch.equal, outputs.hidden_states, outputs.feature_maps))
    # each prior is the class-query projection of SegFormer's normed stage output (the last block's input)
    for stage, feature_map, prior in zip(model.stages, expected, outputs.semantic_priors, strict=True):
        tokens = feature_map.flatten(2).transpose(1, 2)
        query = stage.semantic_layer.blocks[-1].q_proj(tokens).transpose(1, 2).reshape(prior.shape)
        torch.testing.assert_close(prior, query, rtol=0, atol=1e-5)

    use_plain_modules(model)
    with torch.no_grad():
        plain = model(pixel_values).feature_maps
        assert max_difference(plain, expected) == 0.0
        set_gammas(model, 5.0)
        gated = model(pixel_values).feature_maps
    for feature_map, segformer_map in zip(gated, expected):  # the semantic blocks change every stage once gamma != 0
        assert (feature_map - segformer_map).abs().max() > 1e-3


def test_without_semantic_blocks_it_is_segformer_with_its_loss(segformer):
    model = SemaskMitForSemanticSegmentation(
        mit_config(num_semantic_blocks=(0, 0, 0, 0), loss_reduction="valid_pixels")
    )
    result = model.load_state_dict(segformer.state_dict(), strict=False)
    assert result.missing_keys == result.unexpected_keys == []
    model.eval()
    pixel_values, labels = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    labels[:, :8] = 255
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
        expected = segformer(pixel_values, labels=labels)
    assert outputs.semantic_logits is None and outputs.semantic_priors is None
    torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_mlp_head_semantic_branch_and_loss(segformer):
    torch.manual_seed(2)
    model = SemaskMitForSemanticSegmentation(mit_config())
    model.load_state_dict(segformer.state_dict(), strict=False)
    set_gammas(model, 0.5)
    model.eval()
    pixel_values, labels = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    labels[:, :8] = 255
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
        segformer_logits = segformer.decode_head(model.segformer(pixel_values).feature_maps)
    assert outputs.logits.shape == outputs.semantic_logits.shape == (2, 5, 16, 24)
    torch.testing.assert_close(outputs.logits, segformer_logits, rtol=0, atol=1e-6)  # SegFormer's head, as is
    upsampled = 0  # SeMask-FPN's semantic branch: prior i upsampled x2, i times
    for index, prior in enumerate(outputs.semantic_priors):
        for _ in range(index):
            prior = F.interpolate(prior, scale_factor=2, mode="bilinear")
        upsampled = upsampled + prior
    assert not torch.allclose(outputs.semantic_priors[0], upsampled)
    torch.testing.assert_close(outputs.semantic_logits, upsampled, rtol=1e-4, atol=1e-5)

    def cross_entropy(logits: torch.Tensor) -> torch.Tensor:  # mmseg 0.x: the sum over all pixels
        resized = F.interpolate(logits, size=(64, 96), mode="bilinear")
        return F.cross_entropy(resized, labels, ignore_index=255, reduction="sum") / labels.numel()

    expected = cross_entropy(outputs.logits) + 0.4 * cross_entropy(outputs.semantic_logits)
    torch.testing.assert_close(outputs.loss, expected)
    assert 1.0 < outputs.loss < 5.0


@pytest.mark.parametrize("decode_head", ["mlp", "fpn"])
def test_training_lowers_the_loss_and_opens_the_semantic_gates(decode_head):
    torch.manual_seed(0)
    model = SemaskMitForSemanticSegmentation(mit_config(decode_head=decode_head))
    pixel_values, labels = learnable_batch()
    losses = train_steps(model, pixel_values, labels, steps=8)
    assert losses[-1] < 0.92 * losses[0], losses
    gammas = [parameter.item() for name, parameter in model.named_parameters() if name.endswith("gamma")]
    assert len(gammas) == 4 and all(gamma != 0 for gamma in gammas)


def test_fpn_head_builds_on_the_stage_widths():
    model = SemaskMitForSemanticSegmentation(mit_config(decode_head="fpn")).eval()
    in_channels = [head[0].conv.in_channels for head in model.decode_head.scale_heads]
    assert in_channels == [8, 16, 24, 32]
    assert [len(head) for head in model.decode_head.scale_heads] == [1, 2, 4, 6]  # SeMask-FPN's scale heads
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 50, 70))  # odd sizes: 13x18, 7x9, 4x5, 2x3
    assert outputs.logits.shape == outputs.semantic_logits.shape == (1, 5, 13, 18)


def test_eager_and_sdpa_agree_and_eager_returns_attention_weights():
    torch.manual_seed(0)
    model = SemaskMitForSemanticSegmentation(mit_config()).eval()
    set_gammas(model, 0.5)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        sdpa = model(pixel_values)
        model.set_attn_implementation("eager")
        eager = model(pixel_values, output_attentions=True, output_semantic_attentions=True)
    torch.testing.assert_close(eager.logits, sdpa.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager.semantic_logits, sdpa.semantic_logits, rtol=1e-4, atol=1e-5)
    # one per Mix Transformer block: (batch, heads, tokens, tokens reduced by sr_ratio**2)
    assert [tuple(a.shape) for a in eager.attentions] == [
        (1, 1, 256, 4),
        (1, 1, 64, 4),
        (1, 1, 64, 4),
        (1, 2, 16, 4),
        (1, 2, 4, 4),
    ]
    # one per semantic block: 4x4 windows in stages 1-2 (16 and 4 windows), all tokens in stages 3-4
    assert [tuple(a.shape) for a in eager.semantic_attentions] == [(16, 1, 16, 16), (4, 1, 16, 16), (1, 1, 16, 16)] + [
        (1, 1, 4, 4)
    ]
    torch.testing.assert_close(eager.semantic_attentions[0].sum(-1), torch.ones(16, 1, 16))


@pytest.mark.parametrize("decode_head", ["mlp", "fpn"])
def test_gradient_checkpointing_keeps_losses_and_gradients(decode_head):
    torch.manual_seed(0)
    plain = SemaskMitForSemanticSegmentation(mit_config(decode_head=decode_head)).train()
    checkpointed = SemaskMitForSemanticSegmentation(mit_config(decode_head=decode_head)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert (
        checkpointed.decode_head.gradient_checkpointing
        and checkpointed.segformer.stages[0].blocks[0].gradient_checkpointing
    )
    set_gammas(plain, 0.5)
    set_gammas(checkpointed, 0.5)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same drop-path masks
        loss = model(pixel_values, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    for (name, parameter), other in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(other.grad, parameter.grad, atol=1e-6, rtol=1e-5, msg=name)
    for (name, buffer), other in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(other, buffer, atol=1e-7, rtol=0, msg=name)


@pytest.mark.parametrize("decode_head", ["mlp", "fpn"])
def test_cpu_fast_path_agrees_with_the_plain_modules(decode_head):
    torch.manual_seed(0)
    model = SemaskMitForSemanticSegmentation(mit_config(decode_head=decode_head)).eval()
    set_gammas(model, 0.5)
    pixel_values = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        fast = model(pixel_values)
        use_plain_modules(model)
        plain = model(pixel_values)
    torch.testing.assert_close(fast.logits, plain.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.semantic_logits, plain.semantic_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"pixel_values": torch.randn(3, 32, 32)}, r"Expected pixel_values of shape \(batch_size, 3, height, width\)"),
        ({"pixel_values": torch.randn(1, 4, 32, 32)}, r"got \(1, 4, 32, 32\)"),
        ({"labels": torch.zeros(1, 30, 32, dtype=torch.long)}, "pass label maps at the size of `pixel_values`"),
        ({"labels": torch.full((1, 32, 32), 5)}, r"Labels must lie in \[0, 5\) or equal the ignore index 255"),
        ({"labels": torch.zeros(1, 32, 32)}, "Expected integer labels"),
    ],
)
def test_bad_inputs_are_refused(inputs, message):
    model = SemaskMitForSemanticSegmentation(mit_config())
    with pytest.raises(ValueError, match=message):
        model(**{"pixel_values": torch.randn(1, 3, 32, 32), **inputs})


# --- initialisation from SegFormer checkpoints ---


def test_from_an_imagenet_mit_the_encoder_loads_and_the_rest_is_reported_new(tmp_path, caplog):
    torch.manual_seed(3)
    classifier = SegformerForImageClassification(SegformerConfig(**ARCH, num_labels=10))
    classifier.save_pretrained(tmp_path / "mit")
    with caplog.at_level(logging.WARNING):
        model, info = SemaskMitForSemanticSegmentation.from_segformer_pretrained(
            str(tmp_path / "mit"), output_loading_info=True, id2label=LABELS, semantic_window_size=4
        )
    encoder = classifier.segformer.state_dict()
    for key, value in encoder.items():
        torch.testing.assert_close(model.segformer.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert info["unexpected_keys"] == ["classifier.weight", "classifier.bias"]
    missing = info["missing_keys"]
    assert all(".semantic_layer." in key or key.startswith("decode_head.") for key in missing)
    assert "segformer.stages.3.semantic_layer.blocks.0.gamma" in missing and "decode_head.classifier.weight" in missing
    assert len(missing) == 4 * 9 + len(model.decode_head.state_dict())
    assert "segformer.stages.*.semantic_layer.blocks.*.q_proj.weight" in caplog.text
    assert "Unused checkpoint weights: classifier.bias, classifier.weight" in caplog.text
    config = model.config
    assert (config.hidden_sizes, config.depths, config.num_labels) == ([8, 16, 24, 32], [1, 2, 1, 1], 5)
    assert list(config.semantic_attention) == ["windowed"] * 4  # the rule: 5 classes
    assert not model.training


# transformers' names of SegFormer weights -> the older names of the Hub's checkpoints (e.g. nvidia/mit-b0)
LEGACY_NAMES = [
    (r"stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"stages\.(\d+)\.layer_norm", r"encoder.layer_norm.\1"),
    (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
    (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
    (r"attention\.([qkv])_proj", lambda match: "attention.self." + {"q": "query", "k": "key", "v": "value"}[match[1]]),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc([12])", r"mlp.dense\1"),
    (r"layernorm_(before|after)", lambda match: "layer_norm_" + ("1" if match[1] == "before" else "2")),
]


def test_hub_checkpoints_with_the_older_weight_names_load(tmp_path):
    torch.manual_seed(4)
    classifier = SegformerForImageClassification(SegformerConfig(**ARCH, num_labels=10))
    classifier.save_pretrained(tmp_path)
    legacy = {}
    for key, value in load_file(tmp_path / "model.safetensors").items():
        for pattern, replacement in LEGACY_NAMES:
            key = re.sub(pattern, replacement, key)
        legacy[key] = value
    assert "segformer.encoder.block.1.1.attention.self.query.weight" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = SemaskMitForSemanticSegmentation.from_segformer_pretrained(
        str(tmp_path), output_loading_info=True, id2label=LABELS
    )
    assert info["unexpected_keys"] == ["classifier.weight", "classifier.bias"]
    for key, value in classifier.segformer.state_dict().items():
        torch.testing.assert_close(model.segformer.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_from_a_segformer_segmenter_the_head_loads_where_it_fits(segformer, tmp_path):
    segformer.save_pretrained(tmp_path / "segformer")
    model, info = SemaskMitForSemanticSegmentation.from_segformer_pretrained(
        str(tmp_path / "segformer"), output_loading_info=True, semantic_window_size=4
    )
    assert model.config.id2label == LABELS  # the checkpoint's labels
    assert info["unexpected_keys"] == [] and all(".semantic_layer." in key for key in info["missing_keys"])
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # fresh semantic blocks (gamma 0): SegFormer's predictions
        torch.testing.assert_close(model(pixel_values).logits, segformer(pixel_values).logits, rtol=0, atol=1e-6)

    head = {key for key in segformer.state_dict() if key.startswith("decode_head.")}
    for labels in ({"id2label": {0: "a", 1: "b", 2: "c"}}, {"num_labels": 3}):
        other, info = SemaskMitForSemanticSegmentation.from_segformer_pretrained(
            str(tmp_path / "segformer"), output_loading_info=True, **labels
        )
        assert other.config.num_labels == 3
        assert set(info["unexpected_keys"]) == head and head <= set(info["missing_keys"])
    _, info = SemaskMitForSemanticSegmentation.from_segformer_pretrained(
        str(tmp_path / "segformer"), output_loading_info=True, decode_head="fpn"
    )
    assert set(info["unexpected_keys"]) == head
    encoder, info = SemaskMitModel.from_segformer_pretrained(str(tmp_path / "segformer"), output_loading_info=True)
    assert set(info["unexpected_keys"]) == head and all(key.startswith("stages.") for key in info["missing_keys"])
    torch.testing.assert_close(
        encoder.stages[0].patch_embeddings.proj.weight, segformer.segformer.stages[0].patch_embeddings.proj.weight
    )


def test_from_segformer_pretrained_refuses_contradictions_and_other_checkpoints(segformer, tmp_path):
    segformer.save_pretrained(tmp_path / "segformer")
    with pytest.raises(ValueError, match="contradict the SegFormer checkpoint's architecture"):
        SemaskMitForSemanticSegmentation.from_segformer_pretrained(str(tmp_path / "segformer"), hidden_sizes=[8] * 4)
    # equal values given as lists are not contradictions
    SemaskMitForSemanticSegmentation.from_segformer_pretrained(str(tmp_path / "segformer"), depths=[1, 2, 1, 1])
    SemaskMitModel(mit_config()).save_pretrained(tmp_path / "semask-mit")
    with pytest.raises(ValueError, match="Expected a SegFormer checkpoint, got model_type 'semask_mit'"):
        SemaskMitForSemanticSegmentation.from_segformer_pretrained(str(tmp_path / "semask-mit"))


# --- configuration and presets ---


@pytest.mark.parametrize("size", list(SEGFORMER_PARAMS))
def test_presets_are_segformers_mit_sizes_with_the_ade20k_labels(size):
    config = SemaskMitConfig.from_preset(f"semask-mit-{size}-ade20k")
    assert config.num_labels == 150 and config.id2label[0] == "wall" and config.label2id["flag"] == 149
    assert list(config.semantic_attention) == ["windowed", "windowed", "global", "global"]
    assert config.decoder_hidden_size == (256 if size in ("b0", "b1") else 768) and config.drop_path_rate == 0.1
    assert config.decode_head == "mlp" and config.semantic_loss_weight == 0.4 and config.loss_reduction == "all_pixels"
    with torch.device("meta"):
        model = SemaskMitForSemanticSegmentation(config)
    semantic = sum(p.numel() for name, p in model.named_parameters() if ".semantic_layer." in name)
    widths = config.hidden_sizes
    assert semantic == sum(2 * (w * 150 + 150) + 2 * (w * w + w) + 1 for w in widths)  # q, k; v, o; gamma
    segformer_millions = (sum(p.numel() for p in model.parameters()) - semantic) / 1e6
    assert round(segformer_millions, 1) == SEGFORMER_PARAMS[size]


def test_preset_names_overrides_and_processing():
    assert MIT_PRESET_NAMES == tuple(f"semask-mit-b{index}-ade20k" for index in range(6))
    assert SemaskMitConfig.preset_names == MIT_PRESET_NAMES
    config = SemaskMitConfig.from_preset("semask-mit-b1-ade20k", decode_head="fpn", semantic_attention=["global"] * 4)
    assert config.decode_head == "fpn" and list(config.semantic_attention) == ["global"] * 4
    assert mit_processing("semask-mit-b0-ade20k") == {
        "size": {"shortest_edge": 512, "longest_edge": 2048},
        "do_reduce_labels": True,
    }
    assert mit_processing("semask-mit-b5-ade20k")["size"] == {"shortest_edge": 640, "longest_edge": 2048}
    with pytest.raises(ValueError, match="Unknown SeMask-MiT preset 'semask-mit-b6-ade20k'; expected one of"):
        SemaskMitConfig.from_preset("semask-mit-b6-ade20k")


def test_semantic_attention_rule():
    assert mit_semantic_attention(150) == ("windowed", "windowed", "global", "global")
    assert mit_semantic_attention(20, 3) == ("windowed", "global", "global")
    assert mit_semantic_attention(19) == ("windowed",) * 4
    assert SemaskMitConfig(num_labels=171).semantic_attention == ("windowed", "windowed", "global", "global")


def test_config_round_trip(tmp_path):
    config = mit_config(decode_head="fpn", loss_reduction="valid_pixels")
    config.save_pretrained(tmp_path)
    reloaded = SemaskMitConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.id2label == LABELS and reloaded.label2id["person"] == 4 and reloaded.model_type == "semask_mit"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depths": (1, 1, 1)}, r"`depths` needs one value per stage \(4\), got \[1, 1, 1\]"),
        ({"num_semantic_blocks": (1, 1)}, "`num_semantic_blocks` needs one value per stage"),
        ({"semantic_attention": ("windowed",) * 3}, "`semantic_attention` needs one value per stage"),
        ({"semantic_attention": ("windowed", "shifted", "global", "global")}, r"must be in .*got \['shifted'\]"),
        ({"num_semantic_blocks": (1, 0, 1, 1)}, "must be positive for every stage .* or 0 for every stage"),
        ({"num_semantic_blocks": (-1, -1, -1, -1)}, "must be positive for every stage"),
        ({"num_attention_heads": (1, 3, 2, 2)}, "Stage 2 width 16 is not divisible by 3 heads"),
        ({"semantic_window_size": 0}, "`semantic_window_size` must be positive"),
        ({"loss_reduction": "mean"}, "`loss_reduction` must be one of"),
        ({"decode_head": "upernet"}, r"`decode_head` must be one of \('mlp', 'fpn'\), got 'upernet'"),
        ({"reshape_last_stage": False}, "`reshape_last_stage` must be True"),
        ({"id2label": {0: "a", 2: "b"}}, r"class ids 0..1 .*missing ids: \[1\]"),
    ],
)
def test_config_refuses_inconsistent_settings(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        mit_config(**overrides)
