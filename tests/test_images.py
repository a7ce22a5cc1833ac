"""cifar_inception.images: safe decoding, mode conversion, resizing to 32x32."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from cifar_inception.errors import CifarInceptionError
from cifar_inception.images import (
    ImageError,
    find_images,
    load_cifar_array,
    open_image,
    to_cifar_array,
    to_rgb,
)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb_array(height=32, width=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- open_image ------------------------------------------------------------------------------


def test_open_from_bytes_and_path(tmp_path):
    array = rgb_array()
    blob = encode(Image.fromarray(array))
    (tmp_path / "a.png").write_bytes(blob)
    for source in (blob, tmp_path / "a.png", str(tmp_path / "a.png")):
        np.testing.assert_array_equal(np.asarray(open_image(source)), array)


def test_image_error_is_a_cifar_inception_error():
    assert issubclass(ImageError, CifarInceptionError)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match="nope.png: cannot open"):
        open_image(tmp_path / "nope.png")


def test_not_an_image_is_named():
    with pytest.raises(ImageError, match="notes.txt: not an image file"):
        open_image(b"hello, world", name="notes.txt")


def test_truncated_image_is_named():
    blob = encode(Image.fromarray(rgb_array(64, 64)))
    with pytest.raises(ImageError, match="cut.png: corrupt or truncated"):
        open_image(blob[: len(blob) // 2], name="cut.png")


def tiff_with_double_strip_offsets() -> bytes:
    """A 17x13 16-bit greyscale TIFF whose StripOffsets tag is stored as a DOUBLE (type 12)
    where TIFF allows only integers: Pillow's decoder fails on it with a TypeError."""
    width, height, entries = 17, 13, 9
    pixels = bytes(width * height * 2)
    ifd_at = 8
    double_at = ifd_at + 2 + 12 * entries + 4  # after the directory and its next-IFD link
    pixels_at = double_at + 8

    def entry(tag: int, kind: int, value: int) -> bytes:  # kind 3: SHORT, 4: LONG, 12: DOUBLE
        field = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        return struct.pack("<HHI", tag, kind, 1) + field

    directory = [entry(256, 4, width), entry(257, 4, height), entry(258, 3, 16),
                 entry(259, 3, 1), entry(262, 3, 1), entry(273, 12, double_at),
                 entry(278, 4, height), entry(279, 4, len(pixels)), entry(284, 3, 1)]
    return (b"II*\x00" + struct.pack("<IH", ifd_at, entries) + b"".join(directory)
            + struct.pack("<I", 0) + struct.pack("<d", float(pixels_at)) + pixels)


def test_a_decoder_failing_with_an_unexpected_exception_is_a_corrupt_image():
    # Not only OSError and ValueError: any failure of Pillow's decoders but MemoryError.
    with pytest.raises(ImageError, match="odd.tif: corrupt or truncated image"):
        open_image(tiff_with_double_strip_offsets(), name="odd.tif")


def test_truncated_jpeg_is_named():
    blob = encode(Image.fromarray(rgb_array(64, 64)), "JPEG")
    with pytest.raises(ImageError, match="cut.jpg"):
        open_image(blob[: len(blob) // 3], name="cut.jpg")


def test_pixel_limit_is_checked_before_decoding():
    # A 4000x4000 one-bit PNG is a few kilobytes and 16 megapixels.
    bomb = encode(Image.new("1", (4000, 4000)))
    assert len(bomb) < 10_000
    with pytest.raises(ImageError, match="over the limit of 1,000,000"):
        open_image(bomb, name="bomb.png", max_pixels=1_000_000)
    assert open_image(bomb, max_pixels=20_000_000).size == (4000, 4000)


def test_exif_orientation_is_applied():
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    blob = encode(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95)
    image = open_image(blob)
    assert image.size == (20, 40)
    upright = np.asarray(image)
    assert upright[:18].mean() > 200 and upright[22:].mean() < 50  # the white half is on top


def test_bytes_without_a_name_are_called_upload():
    with pytest.raises(ImageError, match="<upload>"):
        open_image(b"junk")


# --- to_rgb ----------------------------------------------------------------------------------


def test_rgb_is_returned_as_is():
    image = Image.fromarray(rgb_array())
    assert to_rgb(image) is image


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)   # opaque: unchanged
    rgba[0, 1] = (10, 20, 30, 0)     # transparent: white
    rgba[1, 0] = (0, 0, 0, 128)      # half black over white: mid grey
    result = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert result[0, 0].tolist() == [10, 20, 30]
    assert result[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in result[1, 0])


def test_greyscale_with_alpha_is_composited():
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), mode="LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_greyscale_and_bilevel_become_three_equal_channels():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    result = np.asarray(to_rgb(Image.fromarray(grey)))
    assert result.shape == (16, 16, 3)
    np.testing.assert_array_equal(result, np.dstack([grey] * 3))
    bilevel = Image.fromarray(grey >= 128)
    assert set(np.unique(np.asarray(to_rgb(bilevel)))) == {0, 255}


def test_palette_with_and_without_transparency():
    array = rgb_array(8, 8)
    palette = Image.fromarray(array).quantize(colors=8)
    np.testing.assert_array_equal(np.asarray(to_rgb(palette)),
                                  np.asarray(palette.convert("RGB")))
    index = np.asarray(palette)[0, 0]
    palette.info["transparency"] = int(index)
    with Image.open(io.BytesIO(encode(palette))) as reread:
        assert reread.mode == "P" and "transparency" in reread.info
        result = np.asarray(to_rgb(reread))
    assert result[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    with Image.open(io.BytesIO(encode(Image.fromarray(values)))) as image:
        assert image.mode.startswith("I")
        result = np.asarray(to_rgb(image))[0, :, 0]
    assert result.tolist() == [0, 1, 128, 255]


def test_float_greyscale_is_scaled_by_its_maximum():
    image = Image.fromarray(np.array([[0.0, 0.5, 2.0]], np.float32))
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 64, 255]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_float_image_with_pixels_that_are_not_numbers_is_refused(value):
    # Its extrema skip a NaN, and a cast to 8 bits would make it black with a warning.
    pixels = np.zeros((40, 40), np.float32)
    pixels[3, 5] = value
    with pytest.raises(ImageError, match="odd.tif: its pixels include values that are not"):
        open_image(encode(Image.fromarray(pixels, mode="F"), "TIFF"), name="odd.tif")


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


# --- to_cifar_array and load_cifar_array -----------------------------------------------------


def test_32x32_rgb_is_left_exactly_as_it_is():
    array = rgb_array()
    result = to_cifar_array(Image.fromarray(array))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


def test_other_sizes_are_squeezed_to_32x32():
    image = Image.new("RGB", (200, 100), (200, 10, 10))
    result = to_cifar_array(image)
    assert result.shape == (32, 32, 3)
    assert np.all(np.abs(result.astype(int) - (200, 10, 10)) <= 1)  # a flat colour stays flat


def test_resize_keeps_the_whole_picture():
    # Left half black, right half white: squeezing (not cropping) keeps both halves.
    array = np.zeros((50, 300, 3), np.uint8)
    array[:, 150:] = 255
    result = to_cifar_array(Image.fromarray(array))
    assert result[:, :14].max() < 10 and result[:, 18:].min() > 245


def test_load_cifar_array_from_bytes_of_any_mode():
    blob = encode(Image.fromarray(rgb_array(40, 60)).convert("L"), "JPEG")
    result = load_cifar_array(blob, name="x.jpg")
    assert result.shape == (32, 32, 3) and result.dtype == np.uint8
    assert np.array_equal(result[..., 0], result[..., 1])


# --- find_images -----------------------------------------------------------------------------


def test_find_images_walks_folders_sorted_and_keeps_files(tmp_path):
    for name in ("b/2.PNG", "b/1.jpg", "a.jpeg", "notes.txt", "c/d/deep.webp"):
        path = tmp_path / "tree" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    single = tmp_path / "single.bin"
    single.write_bytes(b"")
    found = find_images([tmp_path / "tree", single])
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == ["tree/a.jpeg", "tree/b/1.jpg", "tree/b/2.PNG", "tree/c/d/deep.webp",
                     "single.bin"]


# --- what is read at all ---------------------------------------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def test_only_the_accepted_raster_formats_are_tried(monkeypatch):
    from PIL import EpsImagePlugin

    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # what Pillow alone would accept
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript",
                        lambda *a, **k: pytest.fail("Ghostscript was run on an upload"))
    for reader in (open_image, load_cifar_array):
        with pytest.raises(ImageError, match="drawing.eps: not an image file .*PNG, JPEG"):
            reader(EPS, name="drawing.eps")
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        assert open_image(encode(Image.fromarray(rgb_array()), fmt)).size == (32, 32)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="pipe.png: not a regular file .*FIFO"):
        open_image(fifo)  # would block forever if opened for a plain read
    with pytest.raises(ImageError, match="not a regular file .*folder"):
        open_image(tmp_path)


def test_image_header_reads_size_and_transparency_only():
    from cifar_inception.images import image_header

    assert image_header(encode(Image.fromarray(rgb_array(20, 30)))) == (30, 20, False)
    rgba = Image.fromarray(rgb_array(8, 8)).convert("RGBA")
    assert image_header(encode(rgba)) == (8, 8, True)
    with pytest.raises(ImageError, match="not an image file"):
        image_header(EPS, name="drawing.eps")


def test_sixteen_bit_scaling_in_chunks_matches_one_pass():
    from cifar_inception.images import _scale_to_grey

    values = np.random.default_rng(0).integers(0, 65536, (37, 41), dtype=np.uint16)
    expected = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    chunked = _scale_to_grey(Image.fromarray(values), chunk=100)
    np.testing.assert_array_equal(np.asarray(chunked), expected)
