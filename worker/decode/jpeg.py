"""JPEG decoders on the GPU: nvjpeg on CUDA cores (torchvision) and the hardware JPEG engines
(nvImageCodec); which JPEGs they take; synthetic photo-like JPEGs for warm-up and benchmarks.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import torch

EXIF_HEADER = b"Exif\x00\x00"
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
ORIENTATION_TAG = 0x0112


def exif_orientation(segment: bytes) -> int:
    """The orientation tag (1-8) of an APP1 Exif segment's first IFD; 1 (upright) when absent."""
    tiff = segment[len(EXIF_HEADER) :]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) == 12 and int.from_bytes(entry[:2], order) == ORIENTATION_TAG:
            return int.from_bytes(entry[8:10], order)
    return 1


def nvjpeg_decodable(data: bytes) -> bool:
    """Baseline/extended 3-channel upright JPEGs go to the GPU; progressive, grayscale, CMYK and
    rotated ones (an EXIF or XMP orientation, which Pillow's path applies as HF's ``load_image``
    does) go to Pillow.

    Reads only the marker headers up to the first SOF, so it costs microseconds.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in (0xC0, 0xC1):  # baseline / extended sequential Huffman
            return pos + 9 < n and data[pos + 9] == 3
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # progressive, lossless or arithmetic coded
        if marker == 0xDA:
            return False
        if marker == 0xE1:  # APP1: Exif or XMP metadata, which may rotate the image
            segment = data[pos + 4 : pos + 2 + length]
            if segment.startswith(EXIF_HEADER) and exif_orientation(segment) != 1:
                return False
            if segment.startswith(XMP_HEADER) and b"Orientation" in segment:
                return False
        pos += 2 + length
    return False


def photo_like_jpeg(height: int, width: int, seed: int, quality: int) -> bytes:
    """A JPEG with a photo's statistics (smooth colour regions plus sensor-like noise), not a flat
    or pure-noise image, whose sizes and decode costs are not a photo's.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _probe_jpeg() -> bytes:
    """A 16x16 baseline 4:2:0 JPEG: shows whether a hardware decoder really decodes here."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class CudaJpeg:
    """nvjpeg on CUDA cores, through torchvision: any CUDA GPU."""

    name = "cuda"

    def __init__(self, device: torch.device):
        # Imported here, so that a missing torchvision fails at start-up with a clear error.
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = device
        self.mode = ImageReadMode.RGB
        self._decode_jpeg = decode_jpeg

    def decode(self, payloads: list[bytes], stream) -> tuple[list[torch.Tensor | None], object]:
        """CHW uint8 device tensors (None where it can't), and what must outlive their use."""
        decode_jpeg = self._decode_jpeg
        datas = [torch.frombuffer(b, dtype=torch.uint8) for b in payloads]
        try:
            return list(decode_jpeg(datas, mode=self.mode, device=self.device)), None
        except RuntimeError:
            # One bad image fails the whole batched call: retry one by one to isolate it.
            out: list[torch.Tensor | None] = []
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=self.mode, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out, None


class HardwareJpeg:
    """The GPU's hardware JPEG engines (NVJPG on A100, H100, H200...), through nvImageCodec.

    The engines leave the CUDA cores to the model, and their output matched Pillow's
    (libjpeg-turbo's) decode exactly on the benchmark's images, where nvjpeg on CUDA
    cores differs by a few levels (its chroma upsampling is not libjpeg's).
    """

    name = "hardware"

    def __init__(self, device: torch.device):
        from nvidia import nvimgcodec

        self._nv = nvimgcodec
        self.device = device
        self._local = threading.local()
        # Pillow (the CPU path and the float32 reference) ignores EXIF orientation: so does this.
        self.params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB
        )
        probe, _ = self.decode([_probe_jpeg()], torch.cuda.current_stream(device))
        if probe[0] is None or tuple(probe[0].shape) != (3, 16, 16):
            raise RuntimeError(f"{torch.cuda.get_device_name(device)} has no hardware JPEG decoder")

    @property
    def decoder(self):
        # A decoder is not safe to share between threads: one per decode thread.
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            nv = self._nv
            decoder = self._local.decoder = nv.Decoder(
                device_id=self.device.index or 0, backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)]
            )
        return decoder

    def decode(self, payloads: list[bytes], stream) -> tuple[list[torch.Tensor | None], object]:
        images = self.decoder.decode(
            [self._nv.CodeStream(b) for b in payloads], params=self.params, cuda_stream=stream.cuda_stream
        )
        tensors = [
            None if im is None else torch.as_tensor(im, device=self.device).permute(2, 0, 1) for im in images
        ]
        # The Images own the pixels; freeing them while kernels still read them would be a race.
        return tensors, images


JPEG_DECODERS = {"hardware": HardwareJpeg, "cuda": CudaJpeg}
