"""Tests for phi3v.image_processing_phi3v (docs/checkpoint_format.md §3).

Pixel tests compare against `_reference`, an independent step-by-step transcription of the
format's description (PIL ImageOps padding, explicit tile slicing) rather than the module's own helpers.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from phi3v.image_processing_phi3v import (
    CROP_SIZE,
    Phi3VImageProcessor,
    hd_image_size,
    num_image_tokens,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
WHITE = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # normalized 255, float32
BLACK = (0.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)

OFFICIAL_CONFIG = {
    "auto_map": {
        "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    },
    "do_convert_rgb": True,
    "image_mean": CLIP_MEAN,
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": CLIP_STD,
    "num_crops": 4,
    "num_img_tokens": 144,
    "processor_class": "Phi3VProcessor",
}


def _noise(width, height, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _image(width, height, seed=0):
    return Image.fromarray(_noise(width, height, seed))


def _reference(image, num_crops, mean=CLIP_MEAN, std=CLIP_STD):
    """docs/checkpoint_format.md §3, literally: returns (crops (num_crops + 1, 3, 336, 336), (h, w))."""
    img = image.convert("RGB")
    width, height = img.size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = max(s for s in range(1, num_crops + 1) if s * math.ceil(s / ratio) <= num_crops)
    new_w = 336 * scale
    new_h = max(1, int(new_w / ratio))  # the one deliberate difference: at least one row
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / 336) * 336
    top = (target - new_h) // 2
    img = ImageOps.expand(img, border=(0, top, 0, target - new_h - top), fill=(255, 255, 255))
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float() / 255
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    h, w = x.shape[1:]
    crops = [F.interpolate(x[None], size=(336, 336), mode="bicubic", align_corners=False)[0]]
    for r in range(h // 336):
        for c in range(w // 336):
            crops.append(x[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336])
    crops += [torch.zeros(3, 336, 336)] * (num_crops + 1 - len(crops))
    return torch.stack(crops), (h, w)


def _is_white(pixels):
    """pixels: (3, ...) normalized values -> bool tensor (...) where all channels are white."""
    white = WHITE.view(3, *([1] * (pixels.dim() - 1)))
    return (pixels == white).all(dim=0)


# ---------------------------------------------------------------------------------------------
# Sizes and token counts
# ---------------------------------------------------------------------------------------------


def test_spec_token_examples():
    assert num_image_tokens(336, 336) == 313
    assert num_image_tokens(672, 672) == 757
    assert num_image_tokens(1008, 1344) == 1921
    assert num_image_tokens(1344, 1344) == 2509
    assert num_image_tokens(1344, 1008) == 1933  # not symmetric: one newline per local row


@pytest.mark.parametrize(
    "width, height, num_crops, hd_size, tokens",
    [
        (336, 336, 1, (336, 336), 313),
        (672, 672, 4, (672, 672), 757),
        (1344, 1008, 12, (1008, 1344), 1921),
        (1344, 1344, 16, (1344, 1344), 2509),
    ],
)
def test_spec_examples_through_processor(width, height, num_crops, hd_size, tokens):
    out = Phi3VImageProcessor(num_crops=num_crops)(_image(width, height), return_tensors="pt")
    assert out["image_sizes"].tolist() == [list(hd_size)]
    assert out["num_img_tokens"] == [tokens]


# (width, height, num_crops) -> (h, w), worked out by hand from docs/checkpoint_format.md §3.
HAND_COMPUTED = [
    ((1, 1, 1), (336, 336)),
    ((1, 1, 4), (672, 672)),
    ((1, 1, 16), (1344, 1344)),
    ((20, 30, 1), (336, 336)),  # portrait: long side 336, short 224 -> padded 336
    ((20, 30, 4), (672, 672)),  # scale 2: 672 x 448 -> padded 672
    ((20, 30, 16), (1344, 1008)),  # scale 4: 1344 x 896 -> padded 1008 (width)
    ((4000, 300, 1), (336, 336)),  # new_h int(25.2) = 25
    ((4000, 300, 4), (336, 1344)),  # scale 4, new_h 100
    ((4000, 300, 16), (336, 4368)),  # scale 13 (14 * ceil(14/13.3) = 28 > 16), new_h 327
    ((300, 4000, 16), (4368, 336)),
    ((700, 300, 4), (336, 672)),  # new_h 288
    ((672, 300, 1), (336, 336)),  # new_h 149 (float truncation quirk)
    ((672, 300, 16), (1008, 1680)),  # scale 5, new_h 749 (quirk) -> padded 1008
    ((1200, 2, 1), (336, 336)),  # new_h truncates to 0 -> kept as 1 row
    ((2, 1200, 1), (336, 336)),
]


@pytest.mark.parametrize("args, hd_size", HAND_COMPUTED)
def test_hd_image_size_hand_computed(args, hd_size):
    assert hd_image_size(*args) == hd_size


# Sizes checked through the real processor at every num_crops (kept short: each call costs
# a resize and up to 17 crops).
PROCESSOR_SWEEP = [(1, 1), (20, 30), (336, 336), (672, 300), (4000, 300), (300, 4000), (1200, 2)]
# Many more sizes for the pixel-free helpers.
HELPER_SWEEP = PROCESSOR_SWEEP + [
    (30, 20),
    (337, 335),
    (700, 300),
    (300, 700),
    (641, 479),
    (1000, 999),
    (1344, 1008),
    (1920, 1080),
    (1080, 1920),
    (2, 1200),
    (5000, 7),
    (123, 4567),
]


@pytest.mark.parametrize("num_crops", range(1, 17))
def test_processor_sizes_tokens_and_crop_counts(num_crops):
    processor = Phi3VImageProcessor(num_crops=num_crops)
    for width, height in PROCESSOR_SWEEP:
        # Flat colour: the sweep is about geometry; pixels are checked further down.
        out = processor(Image.new("RGB", (width, height), (10, 200, 30)), return_tensors="pt")
        where = f"{width}x{height} at num_crops={num_crops}"
        h, w = out["image_sizes"][0].tolist()
        assert (h, w) == hd_image_size(width, height, num_crops), where
        assert out["num_img_tokens"] == [num_image_tokens(h, w)], where
        pixels = out["pixel_values"][0]
        assert pixels.shape == (num_crops + 1, 3, 336, 336), where
        # Real crops never contain an exact 0 (mean * 255 is not an integer); padding crops
        # are exactly 0.
        local = (h // CROP_SIZE) * (w // CROP_SIZE)
        nonzero = pixels.view(num_crops + 1, -1).abs().amax(dim=1) > 0
        assert nonzero.tolist() == [True] * (1 + local) + [False] * (num_crops - local), where


@pytest.mark.parametrize("num_crops", range(1, 17))
def test_helper_sizes_and_tokens(num_crops):
    processor = Phi3VImageProcessor(num_crops=num_crops)
    for width, height in HELPER_SWEEP:
        where = f"{width}x{height} at num_crops={num_crops}"
        h, w = hd_image_size(width, height, num_crops)
        assert h % CROP_SIZE == 0 and w % CROP_SIZE == 0, where
        assert 1 <= (h // CROP_SIZE) * (w // CROP_SIZE) <= num_crops, where
        # Orientation kept; the long side is exactly 336 * scale, the short side padded.
        assert (h > w) <= (height > width) and (w > h) <= (width > height), where
        ratio = max(width, height) / min(width, height)
        short = max(1, int(max(h, w) / ratio))
        assert min(h, w) == math.ceil(short / 336) * 336, where
        tokens = num_image_tokens(h, w)
        rows, cols = h // 336, w // 336
        assert tokens == rows * 12 * (cols * 12 + 1) + 1 + 12 * 13, where
        assert processor.calc_num_image_tokens_from_image_size(width, height) == tokens, where
        assert processor.calc_num_image_tokens(Image.new("L", (width, height))) == [tokens], where


def test_scale_is_largest_fitting_grid():
    for num_crops in range(1, 17):
        for width in (336, 500, 700, 1000, 1344, 2000, 5000):
            h, w = hd_image_size(width, 336, num_crops)
            rows, cols = h // 336, w // 336
            assert rows * cols <= num_crops
            # One more column would need ceil((cols + 1) / ratio) rows and exceed the budget.
            ratio = width / 336
            assert (cols + 1) * math.ceil((cols + 1) / ratio) > num_crops


def test_num_image_tokens_rejects_non_multiples():
    with pytest.raises(ValueError, match="multiple of 336"):
        num_image_tokens(300, 336)
    with pytest.raises(ValueError, match="multiple of 336"):
        num_image_tokens(0, 336)


def test_calc_num_image_tokens_list_and_override():
    processor = Phi3VImageProcessor(num_crops=4)
    images = [_image(700, 300), _image(300, 700), _image(1, 1)]
    expected = [num_image_tokens(*hd_image_size(*im.size, 4)) for im in images]
    assert processor.calc_num_image_tokens(images) == expected == [457, 469, 757]
    assert processor.calc_num_image_tokens(images[0], num_crops=16) == [
        num_image_tokens(*hd_image_size(700, 300, 16))
    ]
    assert processor.calc_num_image_tokens_from_image_size(1, 1, num_crops=1) == 313


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, num_crops",
    [
        (700, 300, 4),  # landscape, top/bottom padding, float-truncated new_h
        (300, 500, 4),  # portrait: transposed path
        (31, 77, 4),  # portrait upscaled (where the transpose changes PIL's result)
        (1000, 900, 9),  # 3x3-ish grid, strong downscale for the global crop
        (50, 40, 16),
    ],
)
def test_pixels_match_reference(width, height, num_crops):
    image = _image(width, height, seed=width)
    expected, hd_size = _reference(image, num_crops)
    out = Phi3VImageProcessor(num_crops=num_crops)(image, return_tensors="pt")
    assert out["image_sizes"].tolist() == [list(hd_size)]
    assert hd_size == hd_image_size(width, height, num_crops)
    assert out["pixel_values"].dtype == torch.float32
    assert torch.equal(out["pixel_values"][0], expected)


def test_local_tiles_are_the_padded_hd_image_row_major():
    # 1000x500 at num_crops=8 -> HD 672 x 1344: 2 rows x 4 columns of tiles.
    image = _image(1000, 500, seed=3)
    out = Phi3VImageProcessor(num_crops=8)(image, return_tensors="pt")
    assert out["image_sizes"].tolist() == [[672, 1344]]
    new_h = int(1344 / 2.0)  # 672: no padding for an exact 2:1 ratio
    hd = np.asarray(image.resize((1344, new_h), Image.Resampling.BILINEAR))
    x = (torch.from_numpy(hd.copy()).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None]) / (
        torch.tensor(CLIP_STD)[:, None, None]
    )
    pixels = out["pixel_values"][0]
    for index, (r, c) in enumerate([(r, c) for r in range(2) for c in range(4)]):
        tile = x[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336]
        assert torch.equal(pixels[1 + index], tile), (r, c)
    # Global: bicubic, no antialias, of the whole normalized HD tensor.
    glob = F.interpolate(x[None], size=(336, 336), mode="bicubic", align_corners=False, antialias=False)[0]
    assert torch.equal(pixels[0], glob)
    assert not torch.equal(
        pixels[0], F.interpolate(x[None], size=(336, 336), mode="bicubic", antialias=True)[0]
    )
    assert torch.count_nonzero(out["pixel_values"][0, 9:]) == 0


def test_float_truncation_quirk():
    # 672x300: ratio 2.24, 336 / 2.24 = 149.99999999999997 in float64 -> 149 rows, not 150.
    # (The often quoted 700x300 example divides exactly: 288 and 144 rows, checked too.)
    for size, num_crops, new_h in (
        ((672, 300), 1, 149),
        ((672, 300), 4, 299),
        ((700, 300), 4, 288),
        ((700, 300), 1, 144),
    ):
        black = Image.new("RGB", size, (0, 0, 0))
        out = Phi3VImageProcessor(num_crops=num_crops)(black, return_tensors="pt")
        tile = out["pixel_values"][0, 1]  # first local crop
        top = (336 - new_h) // 2
        row_white = _is_white(tile).all(dim=1)  # (336,) per row
        expected = [True] * top + [False] * new_h + [True] * (336 - new_h - top)
        assert row_white.tolist() == expected, (size, num_crops)
        # Image rows keep the exact black value (bilinear of a flat image is flat).
        assert torch.equal(tile[:, top], BLACK[:, None].expand(3, 336))


def test_extreme_aspect_ratio_keeps_one_row():
    for size, axis in (((1200, 2), 1), ((2, 1200), 0)):
        image = Image.new("RGB", size, (0, 0, 0))
        out = Phi3VImageProcessor(num_crops=1)(image, return_tensors="pt")
        assert out["image_sizes"].tolist() == [[336, 336]]
        tile = out["pixel_values"][0, 1]
        white_lines = _is_white(tile).all(dim=axis)  # rows (wide) or columns (tall)
        assert white_lines.tolist() == [True] * 167 + [False] + [True] * 168, size


def test_tall_image_is_padded_left_and_right():
    black = Image.new("RGB", (300, 700), (0, 0, 0))
    out = Phi3VImageProcessor(num_crops=4)(black, return_tensors="pt")
    assert out["image_sizes"].tolist() == [[672, 336]]
    for tile in out["pixel_values"][0, 1:3]:
        white = _is_white(tile)
        assert white.all(dim=0).tolist() == [True] * 24 + [False] * 288 + [True] * 24
        assert not white.all(dim=1).any()  # no white rows: nothing padded at top/bottom
    assert torch.count_nonzero(out["pixel_values"][0, 3:]) == 0


def test_transposed_resize_is_really_transposed():
    # For this upscaled portrait image PIL gives different pixels for "transpose, resize,
    # transpose back" and "resize to the swapped size": the processor must do the former.
    image = _image(31, 77, seed=5)
    out = Phi3VImageProcessor(num_crops=4)(image, return_tensors="pt")
    assert out["image_sizes"].tolist() == [[672, 336]]
    new_long, new_short = 672, int(672 / (77 / 31))
    shortcut = np.asarray(image.resize((new_short, new_long), Image.Resampling.BILINEAR))
    proper = np.asarray(
        image.transpose(Image.Transpose.TRANSPOSE).resize((new_long, new_short), Image.Resampling.BILINEAR)
    ).transpose(1, 0, 2)
    assert not np.array_equal(shortcut, proper)
    left = (336 - new_short) // 2
    got = out["pixel_values"][0, 1:3]  # two tiles stacked vertically
    got = torch.cat(list(got), dim=1)[:, :, left : left + new_short]
    std, mean = torch.tensor(CLIP_STD)[:, None, None], torch.tensor(CLIP_MEAN)[:, None, None]
    expected = (torch.from_numpy(proper.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.equal(got, expected)


def test_336_square_global_equals_local():
    image = _image(336, 336, seed=7)
    pixels = Phi3VImageProcessor(num_crops=1)(image, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (2, 3, 336, 336)
    assert torch.equal(pixels[0], pixels[1])
    # ... and both are the input, merely normalized (no resize, no padding).
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert torch.equal(pixels[1], x)
    # With a larger budget the same image is upscaled to 2x2 crops; the global view differs.
    out = Phi3VImageProcessor(num_crops=4)(image, return_tensors="pt")
    assert out["image_sizes"].tolist() == [[672, 672]]
    assert not torch.equal(out["pixel_values"][0, 0], out["pixel_values"][0, 1])


def test_custom_mean_std_per_call():
    image = Image.new("RGB", (336, 336), (255, 0, 255))
    out = Phi3VImageProcessor()(image, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    pixels = out["pixel_values"][0, 1]
    assert torch.equal(pixels[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))
    # Positional order as in the official preprocess(images, image_mean, image_std, ...).
    again = Phi3VImageProcessor().preprocess(image, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], True, "pt")
    assert torch.equal(again["pixel_values"], out["pixel_values"])


# ---------------------------------------------------------------------------------------------
# Input kinds and modes
# ---------------------------------------------------------------------------------------------


def _modes():
    rgb = _noise(90, 60, seed=11)
    rgba = np.dstack([rgb, _noise(90, 60, seed=12, channels=1)])
    gray = _noise(90, 60, seed=13, channels=1)
    return {
        "L": Image.fromarray(gray),
        "LA": Image.fromarray(rgba).convert("LA"),
        "RGBA": Image.fromarray(rgba),
        "P": Image.fromarray(rgb).quantize(colors=64),
        "CMYK": Image.fromarray(np.dstack([rgb, gray]), mode="CMYK"),
        "1": Image.fromarray(gray).convert("1"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 300),
        "RGB": Image.fromarray(rgb),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "RGB"])
def test_modes_convert_like_pil(mode):
    image = _modes()[mode]
    assert image.mode == mode
    expected, _ = _reference(image.convert("RGB"), 4)
    out = Phi3VImageProcessor(num_crops=4)(image, return_tensors="pt")
    assert torch.equal(out["pixel_values"][0], expected)


def test_rgba_alpha_is_dropped_not_composited():
    rgb = np.full((336, 336, 3), (10, 20, 30), dtype=np.uint8)
    transparent = Image.fromarray(np.dstack([rgb, np.zeros((336, 336), np.uint8)]))
    processor = Phi3VImageProcessor()
    got = processor(transparent)["pixel_values"][0, 1]
    assert torch.equal(got, processor(Image.fromarray(rgb))["pixel_values"][0, 1])
    assert not _is_white(got).any()  # compositing on white would make it all white


def test_numpy_and_torch_inputs_match_pil():
    processor = Phi3VImageProcessor(num_crops=4)
    rgb = _noise(120, 80, seed=21)
    expected = processor(Image.fromarray(rgb))["pixel_values"]
    assert torch.equal(processor(rgb)["pixel_values"], expected)
    assert torch.equal(processor(torch.from_numpy(rgb).permute(2, 0, 1))["pixel_values"], expected)
    # 4 channels: alpha dropped as for PIL RGBA.
    rgba = np.dstack([rgb, np.zeros((80, 120), np.uint8)])
    assert torch.equal(processor(rgba)["pixel_values"], expected)
    gray = _noise(120, 80, seed=22, channels=1)
    expected_gray = processor(Image.fromarray(gray))["pixel_values"]
    assert torch.equal(processor(gray)["pixel_values"], expected_gray)
    assert torch.equal(processor(gray[..., None])["pixel_values"], expected_gray)
    assert torch.equal(processor(torch.from_numpy(gray)[None])["pixel_values"], expected_gray)


def test_batch_of_images_and_output_types():
    images = [_image(336, 336), _image(1000, 300, seed=1), _image(200, 900, seed=2)]
    processor = Phi3VImageProcessor(num_crops=4)
    out = processor(images, return_tensors="pt")
    assert set(out.keys()) == {"pixel_values", "image_sizes", "num_img_tokens"}
    assert out["pixel_values"].shape == (3, 5, 3, 336, 336)
    assert out["image_sizes"].dtype == torch.int64
    assert out["image_sizes"].tolist() == [[672, 672], [336, 1008], [1344, 336]]
    assert out["num_img_tokens"] == [757, 601, 781]
    assert all(type(n) is int for n in out["num_img_tokens"])
    for i, image in enumerate(images):  # a batch is just the images processed one by one
        assert torch.equal(out["pixel_values"][i], processor(image)["pixel_values"][0])
    assert torch.count_nonzero(out["pixel_values"][1, 4:]) == 0  # 3 local crops + padding
    # Per-call num_crops override; tuples work like lists.
    out16 = processor(tuple(images), num_crops=16)
    assert out16["pixel_values"].shape == (3, 17, 3, 336, 336)
    assert processor.num_crops == 4
    as_np = processor(images, return_tensors="np")
    assert isinstance(as_np["pixel_values"], np.ndarray) and as_np["pixel_values"].dtype == np.float32
    assert as_np["image_sizes"].dtype == np.int64
    assert np.array_equal(as_np["pixel_values"], out["pixel_values"].numpy())
    default = processor(images)  # no return_tensors: torch tensors all the same
    assert torch.equal(default["pixel_values"], out["pixel_values"])
    assert Phi3VImageProcessor.model_input_names == ["pixel_values", "image_sizes"]


# ---------------------------------------------------------------------------------------------
# Config save / load
# ---------------------------------------------------------------------------------------------


def test_defaults():
    processor = Phi3VImageProcessor()
    assert processor.num_crops == 1
    assert processor.image_mean == CLIP_MEAN and processor.image_std == CLIP_STD
    assert processor.do_convert_rgb is True
    assert processor.num_img_tokens == 144


def test_save_and_load_round_trip(tmp_path):
    processor = Phi3VImageProcessor(num_crops=16, image_mean=[0.5, 0.4, 0.3], extra_key="kept")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Phi3VImageProcessor"
    assert saved["num_crops"] == 16 and saved["image_mean"] == [0.5, 0.4, 0.3]
    assert saved["extra_key"] == "kept"
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, Phi3VImageProcessor)
    assert loaded.to_dict() == processor.to_dict()
    image = _image(500, 200)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    # Constructor keys can be overridden at load time.
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=4).num_crops == 4


def test_load_official_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(OFFICIAL_CONFIG, indent=2))
    processor = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert processor.num_crops == 4
    assert processor.num_img_tokens == 144
    assert processor.image_mean == CLIP_MEAN and processor.image_std == CLIP_STD
    assert processor.auto_map == OFFICIAL_CONFIG["auto_map"]
    out = processor(_image(700, 300), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)
    # Saving writes back every official key with its value.
    processor.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())
    assert {key: saved.get(key) for key in OFFICIAL_CONFIG} == OFFICIAL_CONFIG
    # Loading straight from the JSON file works too.
    from_file = Phi3VImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json")
    assert from_file.to_dict() == processor.to_dict()


def test_bad_num_crops_in_config_names_the_key(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "num_crops": 0}))
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 17, -1, 2.0, True, "4", None])
def test_bad_num_crops(bad):
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(num_crops=bad)
    if bad is not None:  # None means "use the configured value" in a call
        with pytest.raises(ValueError, match="num_crops"):
            Phi3VImageProcessor()(_image(10, 10), num_crops=bad)
        with pytest.raises(ValueError, match="num_crops"):
            hd_image_size(10, 10, bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("photo.jpg", r"got builtins\.str.*PIL\.Image\.open"),
        (None, "got builtins.NoneType"),
        (42, "got builtins.int"),
        ([Image.new("RGB", (5, 5)), {"a": 1}], r"images\[1\].*got builtins\.dict"),
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8.*float32"),
        (torch.zeros(3, 10, 10), "uint8.*float32"),
    ],
)
def test_bad_input_types(bad, message):
    processor = Phi3VImageProcessor()
    with pytest.raises(TypeError, match=message):
        processor(bad)
    with pytest.raises(TypeError, match=message):
        processor.calc_num_image_tokens(bad)


def test_bad_input_shapes_and_values():
    processor = Phi3VImageProcessor()
    with pytest.raises(ValueError, match="empty list"):
        processor([])
    with pytest.raises(ValueError, match=r"shape \(H, W, C\).*\(3, 10, 12\)"):
        processor(np.zeros((3, 10, 12), dtype=np.uint8))  # CHW numpy
    with pytest.raises(ValueError, match=r"shape \(C, H, W\).*\(10, 12, 3\)"):
        processor(torch.zeros(10, 12, 3, dtype=torch.uint8))  # HWC torch
    with pytest.raises(ValueError, match="empty image"):
        processor(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="width must be a positive int"):
        hd_image_size(0, 5, 1)
    with pytest.raises(ValueError, match="mode 'La'"):
        processor(Image.new("La", (5, 5)))
    with pytest.raises(ValueError, match="return_tensors"):
        processor(_image(5, 5), return_tensors="mlx")
    with pytest.raises(ValueError, match="image_mean must have 3 values"):
        Phi3VImageProcessor(image_mean=[0.5, 0.5])
