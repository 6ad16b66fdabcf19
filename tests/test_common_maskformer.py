"""transformers' common model checks (see `common_checks`) for SeMask-MaskFormer: `SemaskMaskFormerModel` and
`SemaskMaskFormerForInstanceSegmentation`.

Which of transformers' checks apply: `APPLIED` (the check -> the tests here) and `NOT_APPLIED` (-> why not).
The segmentation model runs every group; `SemaskMaskFormerModel` the core, output and initialisation groups.
`torch.export` runs with RUN_SLOW=1 (10-35 s on 2 cores).

"""

import math

from common_checks import (
    BASE_MODEL_NOT_RUN,
    MODEL_CHECKS_NOT_APPLIED,
    SEMANTIC_GATES_AT_ZERO,
    CoreChecks,
    ExportChecks,
    InitChecks,
    ModelCase,
    OutputChecks,
    PrecisionChecks,
    TrainingChecks,
    assert_check_table,
    checks_covered,
    stage_channels,
    stage_sizes,
)
from transformers.models.maskformer.modeling_maskformer import MaskFormerDetrDecoderLayer
from transformers.models.swin.modeling_swin import SwinLayer

from conftest import tiny_maskformer_config_kwargs
from semask import SemaskMaskFormerConfig, SemaskMaskFormerForInstanceSegmentation, SemaskMaskFormerModel
from semask.modeling_semask import SemaskSemanticLayer

FIRST_DECODER_LAYER = r"transformer_module\.decoder\.layers\.0\."
DETR_ZERO_QUERIES = {
    FIRST_DECODER_LAYER + r"self_attn\.(q_proj|k_proj|v_proj)\.": "DETR's first decoder layer runs self-attention "
    "over its all-zero query inputs: v_proj reads zeros and every query attends to the same value vector (v_proj's "
    "bias), so the attention weights, and with them q_proj and k_proj, do not change the output",
}
DETR_ZERO_BIASES = {
    FIRST_DECODER_LAYER + r"(self_attn\.o_proj\.weight|self_attn_layer_norm\.weight)": "that value vector is "
    "v_proj's bias, 0 at initialisation: o_proj reads zeros and the norm after it normalises a constant",
}


def padded_size(config, image_size: tuple[int, int]) -> tuple[int, int]:
    divisor = config.size_divisibility
    return tuple(math.ceil(side / divisor) * divisor for side in image_size)


def hidden_states(config, batch_size: int, image_size: tuple[int, int]) -> dict[str, list[tuple]]:
    """The encoder's feature maps (at the padded size), the FPN's maps from stride 16 to 4 and the DETR decoder's
    input and layer outputs."""
    encoder, decoder = config.backbone_config, config.decoder_config
    sizes = stage_sizes(encoder, *padded_size(config, image_size))
    return {
        "encoder_hidden_states": [(batch_size, c, *size) for c, size in zip(stage_channels(encoder), sizes)],
        "pixel_decoder_hidden_states": [(batch_size, config.fpn_feature_size, *size) for size in reversed(sizes[:-1])],
        "transformer_decoder_hidden_states": [(batch_size, decoder.num_queries, decoder.d_model)]
        * (decoder.decoder_layers + 1),
    }


def attentions(config, batch_size: int, image_size: tuple[int, int]) -> dict[str, list[tuple]]:
    """The self-attention weights of every DETR decoder layer."""
    decoder = config.decoder_config
    shape = (batch_size, decoder.decoder_attention_heads, decoder.num_queries, decoder.num_queries)
    return {"attentions": [shape] * decoder.decoder_layers}


COMMON_SETTINGS = {
    "config_class": SemaskMaskFormerConfig,
    "config_kwargs": tiny_maskformer_config_kwargs,
    "hidden_states": hidden_states,
    "attentions": attentions,
    # GroupNorm(32) of 32-channel maps as small as 1 x 2 normalises a few values per group: float32 kernels that
    # differ with the batch size differ by up to 2e-4 after it (float64 agrees to 1e-13)
    "kernel_atol": 1e-3,
}


class TestSemaskMaskFormerForInstanceSegmentation(
    CoreChecks, OutputChecks, TrainingChecks, InitChecks, PrecisionChecks, ExportChecks
):
    case = ModelCase(
        SemaskMaskFormerForInstanceSegmentation,
        counterpart_class=SemaskMaskFormerModel,
        no_grad_at_init=SEMANTIC_GATES_AT_ZERO | DETR_ZERO_BIASES,
        no_grad_always=DETR_ZERO_QUERIES,
        checkpointed_layers=(SwinLayer, SemaskSemanticLayer, MaskFormerDetrDecoderLayer),
        slow_tests={"test_torch_export": "10-35 s on 2 cores"},
        **COMMON_SETTINGS,
    )


class TestSemaskMaskFormerModel(CoreChecks, OutputChecks, InitChecks):
    """Not run here: training (no loss) and precision (the modules of the segmentation model, checked there)."""

    case = ModelCase(
        SemaskMaskFormerModel,
        counterpart_class=SemaskMaskFormerForInstanceSegmentation,
        not_run=BASE_MODEL_NOT_RUN,
        **COMMON_SETTINGS,
    )


APPLIED = checks_covered(TestSemaskMaskFormerForInstanceSegmentation, TestSemaskMaskFormerModel)
NOT_APPLIED = {
    **MODEL_CHECKS_NOT_APPLIED,
    "test_save_load_keys_to_ignore_on_save": "no `_keys_to_ignore_on_save`: every state-dict key is saved (checked "
    "in test_save_load)",
}
ELSEWHERE = {"ConfigTester (SemaskMaskFormerConfig)": "test_common_config.py"}


def test_check_table():
    assert_check_table(globals())
