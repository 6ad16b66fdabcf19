"""transformers' common model and backbone checks (see `common_checks`) for SeMask-FPN: `SemaskModel`,
`SemaskForSemanticSegmentation` and `SemaskBackbone`.

Which of transformers' checks apply: `APPLIED` (the check -> the tests here) and `NOT_APPLIED` (-> why not).
`SemaskForSemanticSegmentation` runs every group; `SemaskModel` all but training and precision (the same encoder,
run by the model with a head); `SemaskBackbone` the core and backbone groups. `torch.export` runs with RUN_SLOW=1
(tests/test_export.py exports `SemaskForSemanticSegmentation`, with dynamic shapes and to ONNX, in every run).

"""

import math

from common_checks import (
    BASE_MODEL_NOT_RUN,
    MODEL_CHECKS_NOT_APPLIED,
    SEMANTIC_GATES_AT_ZERO,
    BackboneChecks,
    CoreChecks,
    ExportChecks,
    InitChecks,
    ModelCase,
    OutputChecks,
    PrecisionChecks,
    TrainingChecks,
    assert_check_table,
    checks_covered,
    encoder_config,
    stage_channels,
    stage_sizes,
)
from transformers.models.swin.modeling_swin import SwinLayer

from conftest import tiny_config_kwargs
from semask import SemaskBackbone, SemaskForSemanticSegmentation, SemaskModel
from semask.modeling_semask import SemaskFPNHead, SemaskSemanticLayer


def windows(size: tuple[int, int], window: int) -> int:
    return math.ceil(size[0] / window) * math.ceil(size[1] / window)


def encoder_hidden_states(config, batch_size: int, image_size: tuple[int, int]) -> dict[str, list[tuple]]:
    """The patch embeddings, then every stage's output stream, as token sequences."""
    encoder = encoder_config(config)
    tokens = [
        (height * width, channels)
        for (height, width), channels in zip(stage_sizes(encoder, *image_size), stage_channels(encoder))
    ]
    return {"hidden_states": [(batch_size, *tokens[0]), *((batch_size, *shape) for shape in tokens)]}


def encoder_attentions(config, batch_size: int, image_size: tuple[int, int]) -> dict[str, list[tuple]]:
    """Every Swin block's window attention; every semantic block's windowed or global attention (one head)."""
    encoder = encoder_config(config)
    sizes = stage_sizes(encoder, *image_size)
    window, semantic_window = encoder.window_size, encoder.semantic_window_size
    swin = [
        (batch_size * windows(size, window), heads, window**2, window**2)
        for size, depth, heads in zip(sizes, encoder.depths, encoder.num_heads)
        for _ in range(depth)
    ]
    semantic = []
    for size, blocks, kind in zip(sizes, encoder.num_semantic_blocks, encoder.semantic_attention):
        if kind == "windowed":
            shape = (batch_size * windows(size, semantic_window), 1, semantic_window**2, semantic_window**2)
        else:
            shape = (batch_size, 1, size[0] * size[1], size[0] * size[1])
        semantic += [shape] * blocks
    return {"attentions": swin, "semantic_attentions": semantic}


ENCODER_CASE = {
    "config_class": SemaskForSemanticSegmentation.config_class,
    "config_kwargs": tiny_config_kwargs,
    "image_size": (36, 60),  # not a multiple of the patch size or the windows: padded
    "hidden_states": encoder_hidden_states,
    "attentions": encoder_attentions,
    "attention_kwargs": ("output_attentions", "output_semantic_attentions"),
    "slow_tests": {"test_torch_export": "5-25 s on 2 cores; tests/test_export.py exports the FPN model in every run"},
}


class TestSemaskForSemanticSegmentation(
    CoreChecks, OutputChecks, TrainingChecks, InitChecks, PrecisionChecks, ExportChecks
):
    case = ModelCase(
        SemaskForSemanticSegmentation,
        counterpart_class=SemaskModel,
        no_grad_at_init=SEMANTIC_GATES_AT_ZERO,
        checkpointed_layers=(SwinLayer, SemaskSemanticLayer, SemaskFPNHead),
        **ENCODER_CASE,
    )


class TestSemaskModel(CoreChecks, OutputChecks, InitChecks, ExportChecks):
    """Not run here: training and precision (no loss; the encoder is the one run by the model with a head)."""

    case = ModelCase(
        SemaskModel, counterpart_class=SemaskForSemanticSegmentation, not_run=BASE_MODEL_NOT_RUN, **ENCODER_CASE
    )


class TestSemaskBackbone(CoreChecks, BackboneChecks):
    """Not run here: the output, training, initialisation and precision groups (`SemaskModel`'s, which it wraps)."""

    case = ModelCase(
        SemaskBackbone,
        not_run=BASE_MODEL_NOT_RUN,
        **{key: value for key, value in ENCODER_CASE.items() if key not in ("hidden_states", "attentions")},
    )


APPLIED = checks_covered(TestSemaskForSemanticSegmentation, TestSemaskModel, TestSemaskBackbone)
NOT_APPLIED = {
    **MODEL_CHECKS_NOT_APPLIED,
    "test_save_load_keys_to_ignore_on_save": "no `_keys_to_ignore_on_save`: every state-dict key is saved (checked "
    "in test_save_load)",
    "BackboneTesterMixin.test_backbone_use_pretrained_backbone": "loading timm / Hub backbones needs the Hub; "
    "Swin weights load with `from_swin_pretrained` (tests/test_swin_init.py)",
}
ELSEWHERE = {
    "ConfigTester (SemaskConfig)": "test_common_config.py",
    "load_backbone (UperNet on SemaskBackbone)": "test_auto_and_remote_code.py",
    "torch.export with dynamic shapes, ONNX": "test_export.py",
}


def test_check_table():
    assert_check_table(globals())
