"""Path Aggregation Network neck (PANet, Liu et al., CVPR 2018, section 3.1).

An FPN top-down path (1x1 lateral convolutions, nearest-neighbour upsampling, sum, 3x3 output
convolution) followed by PANet's bottom-up path (3x3 stride-2 convolution of the finer output,
sum with the top-down map, 3x3 convolution), every 3x3 convolution followed by a ReLU. Optional
extra levels P6 and P7 come from 3x3 stride-2 convolutions on the coarsest output, as in
RetinaNet and FCOS.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PathAggregationNetwork"]


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision's FPN initialization
    nn.init.zeros_(conv.bias)
    return conv


def _resize_to(x: Tensor, like: Tensor) -> Tensor:
    """Nearest-neighbour resize of ``x`` to the spatial size of ``like`` (odd sizes do not halve exactly)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class PathAggregationNetwork(nn.Module):
    """PAN over backbone features ordered fine to coarse (e.g. C3, C4, C5).

    Args:
        in_channels: channels of each input level, fine to coarse.
        out_channels: channels of every output level.
        extra_levels: 0, 1 (P6) or 2 (P6, P7) levels added above the coarsest input, each at twice
            the previous stride.

    Input: list of ``[B, in_channels[i], H_i, W_i]``. Output: list of ``[B, out_channels, H_i, W_i]``,
    the input levels' sizes followed by the extra levels (``ceil(H / 2)`` each).
    """

    def __init__(self, in_channels: list[int], out_channels: int, *, extra_levels: int = 0) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"Expected at least 2 input levels, got in_channels={in_channels}.")
        if out_channels < 1:
            raise ValueError(f"`out_channels >= 1` must hold, but got ({out_channels=}).")
        if extra_levels not in (0, 1, 2):
            raise ValueError(f"`extra_levels` must be 0, 1 or 2, but got ({extra_levels=}).")
        self.lateral = nn.ModuleList(_conv(c, out_channels, 1) for c in in_channels)
        self.top_down_out = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in in_channels)
        self.downsample = nn.ModuleList(_conv(out_channels, out_channels, 3, stride=2) for _ in in_channels[1:])
        self.bottom_up_out = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in in_channels[1:])
        self.extra = nn.ModuleList(_conv(out_channels, out_channels, 3, stride=2) for _ in range(extra_levels))
        self.out_channels = out_channels

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self.lateral):
            raise ValueError(f"Expected {len(self.lateral)} feature levels, got {len(features)}.")
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]

        # Top-down: coarse semantics flow to the fine levels.
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + _resize_to(merged[0], lateral))
        top_down = [F.relu(conv(m)) for conv, m in zip(self.top_down_out, merged)]

        # Bottom-up: a short path from the fine levels' localization detail to the coarse ones.
        outputs = [top_down[0]]
        for down, out, coarser in zip(self.downsample, self.bottom_up_out, top_down[1:]):
            below = _resize_to(F.relu(down(outputs[-1])), coarser)
            outputs.append(F.relu(out(coarser + below)))

        for i, conv in enumerate(self.extra):
            outputs.append(conv(outputs[-1] if i == 0 else F.relu(outputs[-1])))
        return outputs
