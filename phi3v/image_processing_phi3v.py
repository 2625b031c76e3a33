"""Image processor for Phi-3.5-vision-instruct (format: docs/checkpoint_format.md §3).

Every image becomes an "HD image": resized (aspect ratio kept) so that its long side is a
multiple of 336 and padded with white so that its short side is one too. The model sees a
downscaled "global" 336x336 view of the whole HD image followed by the HD image cut into
336x336 "local" tiles, and the number of image tokens follows from the HD size alone.

    >>> from PIL import Image
    >>> processor = Phi3VImageProcessor(num_crops=4)
    >>> out = processor(Image.new("RGB", (700, 300)), return_tensors="pt")
    >>> out["pixel_values"].shape, out["image_sizes"].tolist(), out["num_img_tokens"]
    (torch.Size([1, 5, 3, 336, 336]), [[336, 672]], [457])

The numbers reproduce the official remote code bit for bit, quirks included (they are marked
"Quirk" below); the released weights were trained on exactly these pixels. One deliberate
difference: an image so wide (or tall) that the resized short side truncates to 0 pixels keeps
one row (the official code crashes inside PIL).

`hd_image_size` and `num_image_tokens` need no pixels, only the image size, so sequence
lengths can be computed from image headers (e.g. for length-grouped batching).

Phi-3-vision-128k-instruct uses the same image processor; its preprocessor_config.json says
num_crops 16 (3.5: 4) and names another file in `auto_map` (`released_auto_map`). Both come
from the checkpoint's file: `from_pretrained` reads them, saving writes them back.
"""

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .configuration_phi3v import PHI3_5V, PHI3V_128K

__all__ = [
    "CROP_SIZE",
    "MAX_NUM_CROPS",
    "Phi3VImageProcessor",
    "Phi3VImageProcessorKwargs",
    "RELEASED_AUTO_MAPS",
    "hd_image_size",
    "num_image_tokens",
    "released_auto_map",
]

# CLIP ViT-L/14 @ 336 input size: every crop, global or local, is 336x336.
CROP_SIZE = 336
# The model card recommends 4 (multi-frame) to 16 (single image); more crops than 16 were
# never trained, so larger values are rejected rather than silently producing unseen inputs.
MAX_NUM_CROPS = 16
# After the 2x2 merge each crop is a 12x12 grid of tokens (24x24 CLIP patches / 2).
_TOKENS_PER_SIDE = 12
_WHITE = 255

# `auto_map` of the released preprocessor_config.json files: Phi-3.5-vision keeps the image
# processor inside processing_phi3_v.py, Phi-3-vision-128k ships it as image_processing_phi3_v.py.
RELEASED_AUTO_MAPS = {
    PHI3_5V: {
        "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    },
    PHI3V_128K: {
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    },
}


def released_auto_map(auto_map: dict | None) -> dict[str, str]:
    """The released auto_map to write for a processor loaded with `auto_map`: the 128k one if it
    is that, else Phi-3.5-vision's (also for processors built in code, which have none)."""
    if auto_map == RELEASED_AUTO_MAPS[PHI3V_128K]:
        return dict(auto_map)
    return dict(RELEASED_AUTO_MAPS[PHI3_5V])


# --------------------------------------------------------------------------------------------
# Pure size arithmetic (no pixels needed)
# --------------------------------------------------------------------------------------------


def _check_num_crops(num_crops: Any) -> int:
    # bool is an int subclass; `num_crops=True` is a bug, not "1 crop".
    if isinstance(num_crops, bool) or not isinstance(num_crops, numbers.Integral):
        raise ValueError(
            f"num_crops must be an int in 1..{MAX_NUM_CROPS}, got {num_crops!r} "
            f"({type(num_crops).__name__}); set it in the constructor, in "
            "preprocessor_config.json or as `num_crops=` in the call"
        )
    if not 1 <= int(num_crops) <= MAX_NUM_CROPS:
        raise ValueError(
            f"num_crops must be an int in 1..{MAX_NUM_CROPS}, got {num_crops}; the released "
            "model uses 4 (multi-frame) or 16 (single image)"
        )
    return int(num_crops)


def _resized_size(long_side: int, short_side: int, num_crops: int) -> tuple[int, int]:
    """(new_long, new_short) of the resize, for an image already oriented long side first."""
    # Plain Python floats are IEEE float64, exactly like the official numpy arithmetic.
    ratio = long_side / short_side
    # Largest s with s * ceil(s / ratio) <= num_crops, found the official way: count up until
    # the condition fails, step back one. The product is non-decreasing in s, so this is the
    # largest such s; s = 1 always qualifies because ratio >= 1.
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_long = scale * CROP_SIZE
    # Quirk: truncation of a float64 quotient, not rounding, so an exact result can lose a
    # pixel: 672x300 has ratio 2.24, 336 / ratio = 149.99999999999997 -> 149 rows instead of
    # 150 (299 instead of 300 at num_crops=4). (700x300, an often quoted example,
    # happens to divide exactly in float64: 672 / 2.3333333333333335 == 288.0.)
    new_short = int(new_long / ratio)
    # Deliberate difference: the official code lets this reach 0 for aspect ratios above
    # 336 * scale (e.g. 1200x2 at num_crops=1) and PIL then raises. One row keeps such images
    # usable and changes nothing for any image the official code accepts.
    return new_long, max(new_short, 1)


def _padded(length: int) -> int:
    return math.ceil(length / CROP_SIZE) * CROP_SIZE


def hd_image_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Size `(h, w)` of the padded HD image for an input image of `width` x `height` pixels.

    Note the orders: the arguments are PIL's (width, height), the result is `image_sizes`'
    (height, width). Both results are multiples of 336 and (h/336) * (w/336) <= num_crops.
    """
    num_crops = _check_num_crops(num_crops)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    # The official code transposes portrait images (strictly width < height) so that the
    # long side comes first; the padding therefore always goes on the short side.
    if width < height:
        new_h, new_w = _resized_size(int(height), int(width), num_crops)
        return new_h, _padded(new_w)
    new_w, new_h = _resized_size(int(width), int(height), num_crops)
    return _padded(new_h), new_w


def num_image_tokens(h: int, w: int) -> int:
    """Number of image-token positions in the prompt for an HD image of size (h, w).

    Local tokens: (h/336 * 12) rows of (w/336 * 12 + 1) tokens (one newline separator per
    row); one global/local separator; global view: 12 rows of 12 + 1 tokens. Written as in
    the official code: (h/336 * w/336 + 1) * 144 + 1 + (h/336 + 1) * 12.
    """
    for name, value in (("h", h), ("w", w)):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Integral)
            or value < CROP_SIZE
            or value % CROP_SIZE
        ):
            raise ValueError(f"{name} must be a positive multiple of {CROP_SIZE}, got {value!r}")
    rows, cols = int(h) // CROP_SIZE, int(w) // CROP_SIZE
    per_crop = _TOKENS_PER_SIDE * _TOKENS_PER_SIDE
    return (rows * cols + 1) * per_crop + 1 + (rows + 1) * _TOKENS_PER_SIDE


# --------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------


def _array_to_pil(array: np.ndarray, layout: str, where: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise TypeError(
            f"{where}: arrays and tensors must be uint8 ({layout}, values 0..255), got dtype "
            f"{array.dtype}; convert float images with (x * 255).round() cast to uint8, or pass a "
            "PIL image"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        # (H, W) -> "L", (H, W, 3) -> "RGB", (H, W, 4) -> "RGBA" (alpha dropped later, as for
        # PIL inputs).
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(
        f"{where}: expected an image of shape {layout} with 1, 3 or 4 channels, or (H, W), "
        f"got shape {tuple(array.shape)}"
    )


def _to_pil(image: Any, where: str) -> Image.Image:
    """Turn one input into a PIL image; the pipeline is defined on PIL images.

    numpy arrays must be uint8 HWC (or HW), torch tensors uint8 CHW (or HW): the layouts that
    `np.asarray(pil_image)` and torchvision's `pil_to_tensor` produce.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, "(H, W, C)", where)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        if array.ndim == 3:
            if array.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"{where}: expected a torch tensor of shape (C, H, W) with 1, 3 or 4 "
                    f"channels, or (H, W), got shape {tuple(array.shape)}"
                )
            array = array.transpose(1, 2, 0)
        return _array_to_pil(array, "(C, H, W)", where)
    raise TypeError(
        f"{where}: expected a PIL.Image.Image, a uint8 numpy array (H, W, C) or a uint8 torch "
        f"tensor (C, H, W), got {type(image).__module__}.{type(image).__qualname__}"
        + (" (open files with PIL.Image.open first)" if isinstance(image, (str, bytes)) else "")
    )


def _as_image_list(images: Any) -> list[Image.Image]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("Phi3VImageProcessor got an empty list of images")
        return [_to_pil(image, f"images[{i}]") for i, image in enumerate(images)]
    return [_to_pil(images, "images")]


def _to_rgb(image: Image.Image) -> Image.Image:
    # Plain PIL conversion, as in the official code: L/1/I;16 -> gray replicated, P -> palette
    # lookup, RGBA/LA/PA -> alpha simply dropped. Do NOT use transformers' convert_to_rgb: since
    # 5.x it composites transparent pixels onto white, which changes the pixels.
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {err}") from err


# --------------------------------------------------------------------------------------------
# Pixel pipeline
# --------------------------------------------------------------------------------------------


def _hd_image(image: Image.Image, num_crops: int) -> np.ndarray:
    """Resize + white-pad an RGB PIL image to its HD size; uint8 array (h, w, 3)."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"cannot process an empty image ({width}x{height} pixels)")
    transposed = width < height
    if transposed:
        # Quirk: the resize must run on the really transposed image. PIL's two-pass fixed-point
        # resampling is not symmetric in x and y, so resizing the original to the swapped size
        # differs by up to 1/255.
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = _resized_size(*image.size, num_crops)
    # PIL bilinear (with its own antialiasing support when shrinking) = torchvision's PIL path.
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    # Pad the short side (rows, in the oriented image) to a multiple of 336: floor of the
    # padding on top, the rest at the bottom.
    target_h = _padded(new_h)
    top = (target_h - new_h) // 2
    hd = np.full((target_h, new_w, 3), _WHITE, dtype=np.uint8)
    hd[top : top + new_h] = resized
    if transposed:
        # Lossless, so numpy is fine here; for portrait images the padding ends up left/right.
        hd = hd.transpose(1, 0, 2)
    return hd


def _normalize(hd: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (3, h, w): (x / 255 - mean) / std, channels first."""
    # The values must be bit-identical to torchvision's ToTensor + Normalize: float32, divide by
    # 255 (multiplying by 1/255 rounds differently), subtract the mean, divide by the std. An
    # elementwise function of a uint8 has only 256 inputs, so apply exactly those operations to
    # the 256 levels once and look the pixels up in the table: same bits, about twice as fast.
    levels = torch.arange(256, dtype=torch.float32).div(255)
    table = ((levels[None] - mean[:, None]) / std[:, None]).numpy()  # (3, 256)
    out = np.empty((3, hd.shape[0], hd.shape[1]), dtype=np.float32)
    for channel in range(3):
        # Indices are uint8, always in range; "clip" just avoids numpy's buffered bounds check.
        np.take(table[channel], hd[..., channel], out=out[channel], mode="clip")
    return torch.from_numpy(out)


def _write_crops(normalized: torch.Tensor, out: torch.Tensor) -> None:
    """Write [global, local tiles row-major] of one normalized HD image into `out[: 1 + k]`."""
    _, h, w = normalized.shape
    # Quirk: the global view is taken *after* normalization with bicubic interpolation and no
    # antialiasing (heavily aliased for big HD images); the white padding is included. For a
    # 336x336 HD image this is the identity.
    global_crop = F.interpolate(
        normalized[None],
        size=(CROP_SIZE, CROP_SIZE),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    rows, cols = h // CROP_SIZE, w // CROP_SIZE
    out[0] = global_crop[0]
    # Row-major tiles: crop 1 + r * cols + c holds rows r*336.. and columns c*336.. of the HD
    # image. Viewing both sides as (rows, cols, 3, 336, 336) copies them in one pass.
    tiles = normalized.view(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4)
    out[1 : 1 + rows * cols].view(rows, cols, 3, CROP_SIZE, CROP_SIZE).copy_(tiles)


def _channel_stats(values: Any, name: str) -> list[float]:
    if isinstance(values, numbers.Real):
        values = [values] * 3
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {values}")
    return values


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


# No `from __future__ import annotations` in this module: huggingface_hub's TypedDict
# validation (used by ProcessorMixin) only checks real annotation objects, not strings.
class Phi3VImageProcessorKwargs(ImagesKwargs, total=False):
    """Phi-3-vision keys on top of the standard image kwargs.

    Listing them here lets `from_pretrained(path, num_crops=16)` override the saved value and
    lets a ProcessorMixin route (and type-check) `num_crops=` for this image processor.
    """

    num_crops: int | None
    num_img_tokens: int | None


class Phi3VImageProcessor(BaseImageProcessor):
    r"""Phi-3.5-vision image processor: HD transform into a global view plus local 336x336 crops.

    Args:
        num_crops (`int`, defaults to 1): maximum number of local crops per image (1..16). Each
            image yields `num_crops + 1` crops in `pixel_values`: the global view, the local
            crops, then all-zero padding crops. The released config uses 4.
        image_mean, image_std (3 floats, default OpenAI CLIP): per-channel normalization.
        do_convert_rgb (`bool`, defaults to True): kept for config compatibility. As in the
            official code, images are always converted to RGB (the vision tower needs 3
            channels), so this flag has no effect.
        num_img_tokens (`int`, defaults to 144): tokens per crop (12 x 12), read by the processor.
        **kwargs: other config keys (`auto_map`, `processor_class`, ...) are kept as attributes
            and saved back.

    Call: `processor(images, return_tensors="pt", num_crops=None)` where `images` is one image
    or a list. An image is a PIL image of any mode (converted with `convert("RGB")`: alpha is
    dropped, not composited), a uint8 numpy array (H, W, C) or a uint8 torch tensor (C, H, W)
    (converted to PIL first; the official code accepts only PIL images).

    Returns a `BatchFeature`:
        - `pixel_values`: float32 (num_images, num_crops + 1, 3, 336, 336);
        - `image_sizes`: int64 (num_images, 2), [h, w] of the padded HD image (not the input);
        - `num_img_tokens`: list of int, image positions each image takes in the prompt.
    `return_tensors` may be "pt" or None (torch tensors) or "np" (numpy arrays).
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImageProcessorKwargs

    def __init__(
        self,
        num_crops: int = 1,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        num_img_tokens: int = 144,
        **kwargs: Any,
    ) -> None:
        # Re-added by to_dict() from the class name; keeping a stale copy would shadow it.
        kwargs.pop("image_processor_type", None)
        # The base class drops processor_class (transformers 5 stores it in
        # processor_config.json), but the official preprocessor_config.json carries it and
        # AutoProcessor reads it from there, so keep it when the config has one.
        processor_class = kwargs.pop("processor_class", None)
        super().__init__(**kwargs)
        if processor_class is not None:
            self.processor_class = processor_class
        self.num_crops = _check_num_crops(num_crops)
        self.image_mean = _channel_stats(image_mean, "image_mean")
        self.image_std = _channel_stats(image_std, "image_std")
        self.do_convert_rgb = do_convert_rgb
        self.num_img_tokens = num_img_tokens

    def _num_crops(self, num_crops: int | None) -> int:
        return self.num_crops if num_crops is None else _check_num_crops(num_crops)

    def preprocess(
        self,
        images: Any,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        return_tensors: str | TensorType | None = None,
        *,
        num_crops: int | None = None,
    ) -> BatchFeature:
        """Turn one image or a list of images into crops; see the class docstring."""
        # Positional order as in the official preprocess(); num_crops is keyword-only.
        num_crops = self._num_crops(num_crops)
        mean = torch.tensor(
            _channel_stats(self.image_mean if image_mean is None else image_mean, "image_mean"),
            dtype=torch.float32,
        )
        std = torch.tensor(
            _channel_stats(self.image_std if image_std is None else image_std, "image_std"),
            dtype=torch.float32,
        )
        if return_tensors is not None:
            return_tensors = TensorType(return_tensors)
            if return_tensors not in (TensorType.PYTORCH, TensorType.NUMPY):
                raise ValueError(f'return_tensors must be "pt", "np" or None, got {return_tensors.value!r}')
        # do_convert_rgb is accepted for signature compatibility only (see class docstring).
        del do_convert_rgb

        pil_images = [_to_rgb(image) for image in _as_image_list(images)]
        # Padding crops stay exactly zero; the model ignores them (image_sizes says how many
        # crops are real).
        pixel_values = torch.zeros(
            len(pil_images), num_crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=torch.float32
        )
        image_sizes = torch.zeros(len(pil_images), 2, dtype=torch.int64)
        for i, image in enumerate(pil_images):
            hd = _hd_image(image, num_crops)
            _write_crops(_normalize(hd, mean, std), pixel_values[i])
            image_sizes[i, 0], image_sizes[i, 1] = hd.shape[0], hd.shape[1]
        tokens = [num_image_tokens(int(h), int(w)) for h, w in image_sizes.tolist()]

        data: dict[str, Any] = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        if return_tensors == TensorType.NUMPY:
            data = {key: value.numpy() for key, value in data.items()}
        # num_img_tokens stays a list of Python ints (the official code turns it into a tensor
        # when return_tensors is set); the processor only needs it to count placeholders.
        data["num_img_tokens"] = tokens
        return BatchFeature(data=data)

    def calc_num_image_tokens(self, images: Any, *, num_crops: int | None = None) -> list[int]:
        """Token count per image (one image or a list), from the image sizes alone."""
        num_crops = self._num_crops(num_crops)
        return [
            num_image_tokens(*hd_image_size(*image.size, num_crops))
            for image in _as_image_list(images)
        ]

    def calc_num_image_tokens_from_image_size(
        self, width: int, height: int, *, num_crops: int | None = None
    ) -> int:
        """Token count for an image of `width` x `height` pixels (PIL order)."""
        return num_image_tokens(*hd_image_size(width, height, self._num_crops(num_crops)))
