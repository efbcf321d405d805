"""Augmented views of uint8 images: crop-with-zero-padding + horizontal flip as one batched gather, and normalisation.

A view id names one augmentation outcome: view = (dy * (2*padding+1) + dx) * 2 + flipped with flip
(or dy * (2*padding+1) + dx without), where (dy, dx) is the crop's top-left corner in the
zero-padded image, exactly as torchvision's RandomCrop(size, padding) picks it before its
RandomHorizontalFlip. The loader draws view ids; the teacher-logit cache renders all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def num_views(padding: int, flip: bool) -> int:
    return (2 * padding + 1) ** 2 * (2 if flip else 1)


def view_id(
    dy: torch.Tensor | int,
    dx: torch.Tensor | int,
    flipped: torch.Tensor | int,
    padding: int,
    flip: bool = True,
):
    """The view id of crop corner (dy, dx) and flip flag, per the layout above."""
    position = dy * (2 * padding + 1) + dx
    return position * 2 + flipped if flip else position


def decode_view_ids(
    view_ids: torch.Tensor, padding: int, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flipped) of each view id."""
    side = 2 * padding + 1
    flipped = view_ids % 2 if flip else torch.zeros_like(view_ids)
    position = view_ids // 2 if flip else view_ids
    return position // side, position % side, flipped


class ViewTables:
    """Where each view's pixels come from in a zero-padded image, so a batch of views is one `torch.take`.

    offsets[v, y, x] is the flat position, within one padded channel plane, of pixel (y, x) of view v
    (its columns reversed when v is flipped). Adding each image's and channel's start gives the index
    of every output pixel in the padded set.
    """

    def __init__(
        self, channels: int, height: int, width: int, padding: int, flip: bool, device: torch.device | str
    ):
        ids = torch.arange(num_views(padding, flip))
        dy, dx, flipped = decode_view_ids(ids, padding, flip)
        columns = torch.arange(width)
        rows = dy[:, None] + torch.arange(height)
        cols = dx[:, None] + torch.where(flipped[:, None].bool(), width - 1 - columns, columns)
        padded_width = width + 2 * padding
        self.plane = (height + 2 * padding) * padded_width
        self.image_size = channels * self.plane
        self.offsets = (rows[:, :, None] * padded_width + cols[:, None, :]).to(device)
        self.channel_starts = (torch.arange(channels) * self.plane).view(1, channels, 1, 1).to(device)

    def gather(self, padded: torch.Tensor, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W): view `view_ids[b]` of padded image `indices[b]` (contiguous set, one device)."""
        image_starts = (indices * self.image_size).view(-1, 1, 1, 1)
        return torch.take(padded, self.offsets[view_ids][:, None] + self.channel_starts + image_starts)


def pad_images(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad uint8 (N, C, H, W) images by `padding` pixels on every side."""
    if padding == 0:
        return images.contiguous()
    return F.pad(images, (padding, padding, padding, padding), mode="constant", value=0).contiguous()


def render_views(
    images: torch.Tensor, view_ids: torch.Tensor, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Render view `view_ids[b]` of `images[b]`: uint8 (B, C, H, W) -> uint8 (B, C, H, W) on the images' device.

    Pixel-exact crop-with-zero-padding then optional horizontal flip, as torchvision's
    RandomCrop(padding=padding) + RandomHorizontalFlip produce for the same offsets; one gather.
    """
    if images.dim() != 4 or view_ids.shape != images.shape[:1]:
        raise ValueError(
            f"need images (B, C, H, W) and view_ids (B,), got {tuple(images.shape)} and {tuple(view_ids.shape)}"
        )
    tables = ViewTables(*images.shape[1:], padding, flip, images.device)
    indices = torch.arange(images.shape[0], device=images.device)
    return tables.gather(pad_images(images, padding), indices, view_ids.to(images.device, torch.int64))


def normalization_constants(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1) float32, with pixel * scale + shift = (pixel/255 - mean) / std."""
    std_t = torch.tensor(std, dtype=torch.float64)
    mean_t = torch.tensor(mean, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
    shift = (-mean_t / std_t).view(1, -1, 1, 1)
    return scale.to(device, torch.float32), shift.to(device, torch.float32)


def normalize_with(
    images_uint8: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`normalize` with precomputed constants; keeps the input's memory format (e.g. channels_last)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = images_uint8.to(work).mul_(scale.to(work)).add_(shift.to(work))
    return out if dtype == work else out.to(dtype)


def normalize(
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> `dtype` (pixel/255 - mean)/std, computed on the images' device in float32."""
    scale, shift = normalization_constants(mean, std, images_uint8.device)
    return normalize_with(images_uint8, scale, shift, dtype)
