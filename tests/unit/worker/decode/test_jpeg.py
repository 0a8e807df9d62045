"""Which JPEGs the GPU decoders take: the header scan, on files Pillow writes."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from tests.support.helpers import jpeg_bytes
from worker.decode.jpeg import exif_orientation, nvjpeg_decodable


def with_app1(jpeg: bytes, segment: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding ``segment`` right after its SOI marker."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


def exif_segment(orientation: int, order: str) -> bytes:
    fmt = "<" if order == "II" else ">"
    ifd = struct.pack(fmt + "H", 2)
    ifd += struct.pack(fmt + "HHIHH", 0x010F, 2, 1, 0, 0)  # Make, before the orientation
    ifd += struct.pack(fmt + "HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"Exif\x00\x00" + order.encode() + struct.pack(fmt + "HI", 42, 8) + ifd + b"\x00" * 4


@pytest.mark.parametrize("order", ["II", "MM"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_rotated_jpegs_go_to_pillow(order, orientation):
    jpeg = with_app1(jpeg_bytes(1), exif_segment(orientation, order))
    assert exif_orientation(exif_segment(orientation, order)) == orientation
    assert Image.open(io.BytesIO(jpeg)).getexif().get(0x0112) == orientation  # Pillow reads it too
    assert nvjpeg_decodable(jpeg) is (orientation == 1)


def test_an_xmp_orientation_goes_to_pillow():
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><tiff:Orientation>6</tiff:Orientation></x:xmpmeta>"
    assert not nvjpeg_decodable(with_app1(jpeg_bytes(1), xmp))
    assert nvjpeg_decodable(with_app1(jpeg_bytes(1), xmp.replace(b"Orientation", b"Software")))


@pytest.mark.parametrize(
    "kwargs,gpu",
    [
        ({}, True),
        ({"progressive": True}, False),
        ({"mode": "L"}, False),
        ({"mode": "CMYK"}, False),
    ],
)
def test_baseline_colour_jpegs_go_to_the_gpu(kwargs, gpu):
    assert nvjpeg_decodable(jpeg_bytes(2, **kwargs)) is gpu
    assert not nvjpeg_decodable(b"\x89PNG\r\n\x1a\n")
