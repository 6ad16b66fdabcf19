"""The FaPN and MSFaPN pixel decoders of SeMask-Mask2Former (Huang et al., "FaPN: Feature-aligned Pyramid Network
for Dense Image Prediction"), as the original `PixelFANDecoder` and `MSDeformAttnPixelFANDecoder` compute them.

FaPN: a top-down FPN over the four encoder stages in which each finer level is aligned to the upsampled coarser one
by a modulated deformable 3x3 convolution (DCNv2, 8 deformable groups, offsets and modulation predicted from the
features). MSFaPN: transformers' Mask2Former pixel decoder (multi-scale deformable attention over the three coarsest
stages) whose FPN level is such an aligned level. The deformable convolution is torchvision's `deform_conv2d` (no
compiled extension).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d
from transformers import Mask2FormerConfig
from transformers import initialization as init
from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder, Mask2FormerPixelDecoderOutput

FAPN_NORM_GROUPS = 32  # the original's "GN" norm: detectron2's GroupNorm(32, channels)
FAPN_FEATURE_LEVELS = 3  # coarsest levels handed to the transformer decoder, as in the original


class SemaskModulatedDeformConv(nn.Module):
    """DCNv2 with `extra_offset_mask`: a 3x3 deformable convolution of `hidden_states` whose sampling offsets and
    modulation come from `offset_features` through `conv_offset_mask`.

    `conv_offset_mask` predicts `3 * groups * 9` channels, split in three: the first two thirds concatenated are the
    offsets as DCNv2 reads them (pairs (dy, dx) per group and kernel position, the layout `deform_conv2d` reads), the
    last third the modulation before a sigmoid.
    """

    def __init__(self, channels: int, deformable_groups: int = 8, kernel_size: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.padding = kernel_size // 2
        self.conv_offset_mask = nn.Conv2d(
            channels, 3 * deformable_groups * kernel_size**2, kernel_size, padding=self.padding
        )

    def forward(self, hidden_states: torch.Tensor, offset_features: torch.Tensor) -> torch.Tensor:
        offset_y, offset_x, modulation = self.conv_offset_mask(offset_features).chunk(3, dim=1)
        offset = torch.cat([offset_y, offset_x], dim=1)
        # torchvision's CPU kernel crashes on NaN or huge offsets. A sample beyond the map reads 0 (in DCNv2 too, where
        # a NaN position also reads 0), so offsets clamped to just beyond the map give the same output.
        limit = float(max(hidden_states.shape[-2:]) + 2 * self.padding + 1)
        offset = offset.nan_to_num(nan=limit).clamp(-limit, limit)
        mask = modulation.sigmoid()
        # torchvision has no bfloat16 CPU kernel and no CPU autocast for it: half precision runs in float32, with every
        # input in one dtype (under autocast the offsets come in half precision), and returns in the weights' dtype.
        dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        with torch.autocast(hidden_states.device.type, enabled=False):
            hidden_states, offset, weight, bias, mask = (
                tensor.to(dtype) for tensor in (hidden_states, offset, self.weight, self.bias, mask)
            )
            output = deform_conv2d(hidden_states, offset, weight, bias, padding=self.padding, mask=mask)
        return output.to(self.weight.dtype)


class SemaskFaPNConv2d(nn.Conv2d):
    """A pyramid convolution: `nn.Conv2d`, initialised with caffe2's Xavier fill as the original does."""


class SemaskFaPNConv(nn.Sequential):
    """A convolution without bias followed by GroupNorm(32) (the original's detectron2 `Conv2d(..., norm="GN")`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = SemaskFaPNConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(FAPN_NORM_GROUPS, out_channels)


class SemaskFaPNLevel(nn.Module):
    """One finer pyramid level: lateral 1x1 conv, feature alignment (the original `FeatureAlign`), 3x3 output conv.

    `top_down = lateral + upsample(coarser)` (nearest in FaPN, bilinear in MSFaPN); the offsets come from
    `concat(lateral, 2 * top_down)` through a 1x1 conv; `aligned = relu(dcn(top_down, offsets)) + lateral`; the output
    is `relu(norm(conv3x3(aligned)))`. The offset conv and the output conv share one GroupNorm, as in the original
    (which hands the same norm module to both).
    """

    def __init__(self, in_channels: int, channels: int, upsampling: str = "nearest"):
        super().__init__()
        self.upsampling = upsampling
        self.lateral = SemaskFaPNConv(in_channels, channels, 1)
        self.offset = SemaskFaPNConv2d(2 * channels, channels, 1, bias=False)
        self.deform_conv = SemaskModulatedDeformConv(channels)
        self.output = SemaskFaPNConv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(FAPN_NORM_GROUPS, channels)

    def forward(self, features: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        lateral = self.lateral(features)
        top_down = lateral + F.interpolate(coarser, size=lateral.shape[-2:], mode=self.upsampling)
        offsets = self.norm(self.offset(torch.cat([lateral, 2 * top_down], dim=1)))
        aligned = F.relu(self.deform_conv(top_down, offsets)) + lateral
        return F.relu(self.norm(self.output(aligned)))


class SemaskFaPNPixelDecoder(nn.Module):
    """The FaPN pixel decoder: the coarsest stage through a 3x3 conv, then each finer stage through a
    `SemaskFaPNLevel`; the finest output through a 3x3 conv (with bias) gives the mask features.

    Returns the mask features and the `FAPN_FEATURE_LEVELS` coarsest pyramid outputs, coarse to fine (what
    transformers' Mask2Former transformer decoder takes).
    """

    def __init__(self, feature_channels: list[int], channels: int, mask_channels: int):
        super().__init__()
        self.coarsest = SemaskFaPNConv(feature_channels[-1], channels, 3)
        self.levels = nn.ModuleList([SemaskFaPNLevel(in_channels, channels) for in_channels in feature_channels[:-1]])
        self.mask_projection = SemaskFaPNConv2d(channels, mask_channels, 3, padding=1)

    def forward(
        self, feature_maps: tuple[torch.Tensor, ...], output_hidden_states: bool = False
    ) -> Mask2FormerPixelDecoderOutput:
        outputs = [F.relu(self.coarsest(feature_maps[-1]))]
        for level, features in zip(reversed(self.levels), reversed(feature_maps[:-1])):
            outputs.append(level(features, outputs[-1]))
        return Mask2FormerPixelDecoderOutput(
            mask_features=self.mask_projection(outputs[-1]), multi_scale_features=tuple(outputs[:FAPN_FEATURE_LEVELS])
        )


class SemaskMSFaPNPixelDecoder(Mask2FormerPixelDecoder):
    """transformers' Mask2Former pixel decoder with the FPN level of the finest stage made a `SemaskFaPNLevel`
    (bilinear upsampling), as the original `MSDeformAttnPixelFANDecoder`.

    The parent computes the three deformable-attention levels; its mask projection is the identity here, so its
    `mask_features` are its finest output, which the FaPN level refines before `fpn_mask_projection`.
    """

    def __init__(self, config: Mask2FormerConfig, feature_channels: list[int]):
        super().__init__(config, feature_channels=feature_channels)
        for index in range(self.num_fpn_levels):  # transformers' plain FPN convs, replaced by FaPN levels
            delattr(self, f"adapter_{index + 1}")
            delattr(self, f"layer_{index + 1}")
        self.levels = nn.ModuleList(
            [
                SemaskFaPNLevel(in_channels, config.feature_size, upsampling="bilinear")
                for in_channels in feature_channels[: self.num_fpn_levels]
            ]
        )
        self.num_fpn_levels = 0
        self.fpn_mask_projection = SemaskFaPNConv2d(config.feature_size, config.mask_feature_size, 1)
        self.mask_projection = nn.Identity()

    def forward(
        self, feature_maps: tuple[torch.Tensor, ...], output_hidden_states: bool = False
    ) -> Mask2FormerPixelDecoderOutput:
        decoded = super().forward(feature_maps, output_hidden_states=output_hidden_states)
        finest = decoded.mask_features  # the deformable-attention levels' finest output (identity projection)
        for level, features in zip(reversed(self.levels), reversed(feature_maps[: len(self.levels)])):
            finest = level(features, finest)
        return Mask2FormerPixelDecoderOutput(
            mask_features=self.fpn_mask_projection(finest),
            multi_scale_features=decoded.multi_scale_features,
            attentions=decoded.attentions,
        )


def init_fapn_weights(module: nn.Module) -> None:
    """The original initialisation of `module` if it is a FaPN one: caffe2's Xavier fill (uniform, zero bias) for the
    pyramid's convolutions; DCNv2's for the deformable ones (uniform weights in ±1/sqrt(fan_in), zero bias, zero
    offsets and modulation)."""
    if isinstance(module, SemaskFaPNConv2d):
        init.kaiming_uniform_(module.weight, a=1)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, SemaskModulatedDeformConv):
        bound = 1 / math.sqrt(module.weight[0].numel())
        init.uniform_(module.weight, -bound, bound)
        init.zeros_(module.bias)
        init.zeros_(module.conv_offset_mask.weight)
        init.zeros_(module.conv_offset_mask.bias)
