"""Image decoding never surprises: odd modes, orientation, huge and broken files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extract.images import ImageDecodeError, fit_to_input, read_image


def _gradient(width=40, height=30):
    x = np.linspace(0, 255, width, dtype=np.uint8)
    return np.repeat(np.stack([x, x[::-1], np.full_like(x, 128)], axis=1)[None], height, axis=0)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.fromarray(_gradient()[:, :, 0]).save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png")
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_cmyk_jpeg(tmp_path):
    Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    rgb = read_image(tmp_path / "c.jpg")
    assert rgb.shape == (30, 40, 3)
    assert np.abs(rgb.astype(int) - _gradient().astype(int)).mean() < 12


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:5, :, :3] = (255, 0, 0)
    rgba[:5, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = read_image(tmp_path / "a.png")
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[9, 9]) == (255, 255, 255)


def test_palette_image_gives_each_pixel_its_palette_colour(tmp_path):
    paletted = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette = np.asarray(paletted.getpalette(), np.uint8).reshape(-1, 3)
    indices = np.asarray(paletted)
    paletted.save(tmp_path / "p.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "p.gif"), palette[indices])
    # an index marked transparent is shown on white, the others keep their colour
    paletted.save(tmp_path / "t.png", transparency=int(indices[0, 0]))
    expected = np.where((indices == indices[0, 0])[..., None], np.uint8(255), palette[indices])
    np.testing.assert_array_equal(read_image(tmp_path / "t.png"), expected)


def test_16_bit_png_uses_the_full_range(tmp_path):
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 4 + 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    rgb = read_image(tmp_path / "d.png")
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255  # scaled, not clipped to white


# What a viewer shows for each EXIF orientation (TIFF 6.0, tag 0x0112: where the stored
# image's row 0 and column 0 go), as an operation on the stored (rows, columns) array.
EXIF_DISPLAYED = {
    1: lambda a: a,  # row 0 top, column 0 left
    2: lambda a: a[:, ::-1],  # row 0 top, column 0 right: mirrored
    3: lambda a: a[::-1, ::-1],  # row 0 bottom, column 0 right: turned half round
    4: lambda a: a[::-1],  # row 0 bottom, column 0 left: flipped
    5: lambda a: a.transpose(1, 0, 2),  # row 0 left, column 0 top: transposed
    6: lambda a: np.rot90(a, -1),  # row 0 right, column 0 top: turned a quarter clockwise
    7: lambda a: np.rot90(a, -1)[::-1],  # row 0 right, column 0 bottom: transverse
    8: lambda a: np.rot90(a, 1),  # row 0 left, column 0 bottom: turned a quarter anticlockwise
}


@pytest.mark.parametrize("orientation", sorted(EXIF_DISPLAYED))
def test_exif_orientation_gives_the_displayed_pixels(tmp_path, orientation):
    """2 x 3 blocks of 16 px, each its own colour: each of the 8 orientations gives another array.
    Blocks on JPEG's 8 px grid, no chroma subsampling, quality 100: each decodes within 2 levels
    of its colour (1 here), where another orientation would put a colour 255 levels off."""
    colours = np.array([[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]], np.uint8)
    stored = np.kron(colours, np.ones((16, 16, 1), np.uint8))  # 32 x 48
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=100, subsampling=0)
    decoded = read_image(tmp_path / "o.jpg")
    expected = EXIF_DISPLAYED[orientation](stored)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).max() <= 2


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(tmp_path / "big.jpg")
    small = read_image(tmp_path / "big.jpg", min_side=224)
    assert min(small.shape[:2]) >= 224 and max(small.shape[:2]) <= 1000
    assert read_image(tmp_path / "big.jpg").shape == (3000, 4000, 3)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\0" * 50])
def test_broken_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        read_image(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageDecodeError, match="nowhere.png.*not found"):
        read_image(tmp_path / "nowhere.png")


def test_fit_to_input_centre_crops_the_shorter_side():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # a white centre square
    out = fit_to_input(image, 50)
    assert out.shape == (50, 50, 3) and out.mean() > 250
    with pytest.raises(ValueError, match="crop_pct"):
        fit_to_input(image, 50, crop_pct=0)


def _wide_image_with_marked_ends():
    image = np.full((100, 200, 3), 128, np.uint8)
    image[:, :12] = (255, 0, 0)  # red left end
    image[:, -12:] = (0, 0, 255)  # blue right end
    return image


def _has(square: np.ndarray, colour) -> bool:
    return bool(np.any(np.all(np.abs(square.astype(int) - colour) < 40, axis=-1)))


def test_resize_modes_keep_or_cut_the_ends_of_a_wide_image():
    from extract.images import PAD_VALUE

    image = _wide_image_with_marked_ends()
    centre, warp, pad = (fit_to_input(image, 64, resize=mode) for mode in ("centre", "warp", "pad"))
    assert all(square.shape == (64, 64, 3) for square in (centre, warp, pad))
    assert not _has(centre, (255, 0, 0)) and not _has(centre, (0, 0, 255))  # the centre square cuts both ends
    for square in (warp, pad):
        assert _has(square[:, :8], (255, 0, 0)) and _has(square[:, -8:], (0, 0, 255))
    np.testing.assert_array_equal(pad[0, 32], PAD_VALUE)  # padded above and below
    assert _has(warp[0], (255, 0, 0))  # stretched: the image fills the square
    with pytest.raises(ValueError, match="resize='squash' is not one of"):
        fit_to_input(image, 64, resize="squash")
