"""Stage 3 — decode: bytes to a normalized pixel batch, following the model's image-processor config.

Two decoders share one ``Preprocess`` spec:
- ``CpuDecoder``: Pillow, numerically the same steps as the Hugging Face PIL image
  processor (resize with its resample, rescale in float64, normalize in float32).
- ``GpuDecoder``: batched JPEG decode on the GPU, then Pillow's resize, bit for bit, and the
  normalize as two Triton kernels per distinct input size (torch's resize where Triton can't
  run). The JPEG decode runs on CUDA cores (nvjpeg through torchvision), or on the GPU's
  hardware JPEG engines (NVJPG on A100/H100/H200, through nvImageCodec), which reproduce
  Pillow's pixels exactly but were slower end to end on an H100 (benchmarks/NOTES.md). What neither can read (PNG, WebP, CMYK, progressive
  JPEGs...) goes through Pillow and is copied in.
An image no decoder can read becomes an error, never a crash.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

# Pillow's resample codes, as stored in preprocessor_config.json.
_NEAREST, _LANCZOS, _BILINEAR, _BICUBIC = 0, 1, 2, 3
_TORCH_MODE = {_NEAREST: "nearest", _BILINEAR: "bilinear", _BICUBIC: "bicubic", _LANCZOS: "bicubic"}


@dataclass(frozen=True)
class Preprocess:
    height: int
    width: int
    shortest_edge: int | None
    crop: tuple[int, int] | None
    resample: int
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, cfg: dict) -> Preprocess:
        size = cfg.get("size") or {"height": 224, "width": 224}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        do_crop = cfg.get("do_center_crop", False)
        crop = None
        if do_crop:
            crop_size = cfg.get("crop_size") or size
            if isinstance(crop_size, int):
                crop_size = {"height": crop_size, "width": crop_size}
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        shortest = size.get("shortest_edge") if cfg.get("do_resize", True) else None
        if cfg.get("do_resize", True) and shortest is None and "height" not in size:
            raise ValueError(f"unsupported image-processor size {size!r}")
        height = int(size.get("height", shortest or 0))
        width = int(size.get("width", shortest or 0))
        if crop is None and shortest is not None:
            raise ValueError("a shortest_edge resize needs do_center_crop to give a fixed batch shape")
        return cls(
            height=height,
            width=width,
            shortest_edge=int(shortest) if shortest is not None else None,
            crop=crop,
            resample=int(cfg.get("resample", _BILINEAR)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
            mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))) if cfg.get("do_normalize", True) else None,
            std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))) if cfg.get("do_normalize", True) else None,
        )

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.crop if self.crop else (self.height, self.width)

    def resize_hw(self, in_h: int, in_w: int) -> tuple[int, int]:
        if self.shortest_edge is None:
            return self.height, self.width
        short, long = (in_w, in_h) if in_w <= in_h else (in_h, in_w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if in_w <= in_h else (new_short, new_long)

    def crop_box(self, h: int, w: int) -> tuple[int, int]:
        ch, cw = self.crop
        return (h - ch) // 2, (w - cw) // 2


@dataclass
class DecodedBatch:
    """Pixels for the images that decoded; ``ok`` indexes them within the batch.

    Pillow batches hold only the ok rows (row k is image ok[k]); GPU batches are a
    fixed-shape buffer where row i is image i (``rows_aligned``), and ``ready`` is
    the CUDA event the compute stream waits on before reading it.
    """

    pixels: torch.Tensor
    ok: list[int]
    errors: dict[int, str]
    rows_aligned: bool = False
    ready: object = None
    slot: int | None = None
    # Decoder-owned device memory the batch's queued kernels still read; dropped once they ran.
    keepalive: object = None


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Blend transparency onto white, as the Hugging Face processors do.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def pil_resized(data: bytes, pre: Preprocess) -> np.ndarray:
    """Decode with Pillow and resize (and crop): uint8 HWC, or raise with a reason."""
    from PIL import Image

    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = _to_rgb(img)
    h, w = pre.resize_hw(rgb.height, rgb.width)
    rgb = rgb.resize((w, h), resample=pre.resample, reducing_gap=None)
    arr = np.asarray(rgb)
    if pre.crop:
        top, left = pre.crop_box(h, w)
        ch, cw = pre.crop
        arr = arr[top : top + ch, left : left + cw]
    return arr


def normalize_numpy(batch_hwc: np.ndarray, pre: Preprocess) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32, with the HF processor's arithmetic."""
    x = batch_hwc.astype(np.float64)
    if pre.rescale_factor is not None:
        x = x * pre.rescale_factor
    x = x.astype(np.float32)
    if pre.mean is not None:
        x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _describe(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "undecodable image: not a format Pillow recognises (corrupt or not an image)"
    return f"undecodable image: {type(exc).__name__}: {exc}"


class CpuDecoder:
    """Pillow decode in a thread pool (Pillow releases the GIL while decoding and resizing)."""

    def __init__(self, pre: Preprocess, pool: Executor):
        self.pre = pre
        self.pool = pool

    def decode_arrays(self, payloads: Sequence[bytes]) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
        def one(data: bytes):
            try:
                return pil_resized(data, self.pre), None
            except Exception as exc:  # noqa: BLE001 - any undecodable input is an error row
                return None, _describe(exc)

        ok, arrays, errors = [], [], {}
        for i, (arr, err) in enumerate(self.pool.map(one, payloads)):
            if err is None:
                ok.append(i)
                arrays.append(arr)
            else:
                errors[i] = err
        return ok, arrays, errors

    def __call__(self, payloads: Sequence[bytes]) -> DecodedBatch:
        ok, arrays, errors = self.decode_arrays(payloads)
        h, w = self.pre.output_hw
        if arrays:
            pixels = torch.from_numpy(normalize_numpy(np.stack(arrays), self.pre))
        else:
            pixels = torch.empty((0, 3, h, w), dtype=torch.float32)
        return DecodedBatch(pixels, ok, errors)


def resize_like_pillow(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a float (N,C,H,W) batch of 0..255 values as Pillow resizes a uint8 image.

    Pillow resamples in two passes, horizontal then vertical, rounding to uint8 after
    each. So does this, with the same antialiasing filter: one 2-D float pass differs
    from Pillow's pixels by 0.27 levels on average, this by 0.015 (Pillow's fixed-point
    weights differ in the last bits).
    """
    import torch.nn.functional as F

    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    for step in ((x.shape[-2], size[1]), size):
        x = (
            F.interpolate(x, size=step, mode=mode, antialias=True, align_corners=False)
            .round_()
            .clamp_(0, 255)
        )
    return x


def nvjpeg_decodable(data: bytes) -> bool:
    """Baseline/extended 3-channel JPEGs go to nvjpeg; progressive, grayscale and CMYK go to Pillow.

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
    cores differs by up to 6 levels (its chroma upsampling is not libjpeg's).
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


class GpuDecoder:
    """Batched JPEG decode, then Pillow's exact resize + normalize as two Triton kernels per
    input size (``worker.pillow_resize``), written straight into the batch buffer's rows.

    Each calling thread gets its own high-priority CUDA stream, so several decode
    threads overlap with each other and the decode kernels cut ahead of the long
    model kernels instead of queueing behind them.
    """

    def __init__(
        self,
        pre: Preprocess,
        pool: Executor,
        device: torch.device,
        dtype=torch.bfloat16,
        jpeg: str | None = "cuda",
        resize_dtype=torch.float32,
    ):
        """``jpeg``: "cuda" or "hardware" (a key of ``JPEG_DECODERS``), or None for Pillow only."""
        self.jpeg = JPEG_DECODERS[jpeg](device) if jpeg else None
        self.pre = pre
        self.cpu = CpuDecoder(pre, pool)
        self.device = device
        self.dtype = dtype
        self.resize_dtype = resize_dtype
        self._local = threading.local()
        mean = torch.tensor(pre.mean or (0.0, 0.0, 0.0), device=device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std or (1.0, 1.0, 1.0), device=device).view(1, 3, 1, 1)
        scale = pre.rescale_factor or 1.0
        # x*scale then (x-mean)/std folded into one multiply-add.
        self.mul = (scale / std).float()
        self.add = (-mean / std).float()
        self.mode = _TORCH_MODE.get(pre.resample, "bilinear")
        self.resize = self._pillow_resize(pre, device)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def _pillow_resize(self, pre: Preprocess, device: torch.device):
        """Pillow's exact resize as Triton kernels, compiled here on a dummy image; None (the
        torch resize instead) where the filter has no fixed-point form or Triton can't run.
        """
        from worker.pillow_resize import FILTERS, PillowResize

        if pre.resample not in FILTERS:
            return None

        def crop(h: int, w: int) -> tuple[int, int, int, int]:
            return (*pre.crop_box(h, w), *pre.crop) if pre.crop else (0, 0, h, w)

        resize = PillowResize(pre.resample, self.mul, self.add, pre.resize_hw, crop)
        try:
            scratch = torch.empty((1, 3, *pre.output_hw), device=device, dtype=self.dtype)
            resize(
                torch.zeros((1, 3, 480, 640), dtype=torch.uint8, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
                scratch,
            )
        except Exception as exc:  # noqa: BLE001 - no Triton or no compiler: the torch resize still works
            log.warning(
                "Pillow-exact GPU resize unavailable (%s: %s); using torch's resize", type(exc).__name__, exc
            )
            return None
        return resize

    def warm_up(self, batch_size: int, calls: int = 16) -> None:
        """Decode a few full batches of synthetic photos, from the thread that will decode.

        On an H100 a process's first ~10 nvjpeg batch calls took ~100 ms each against ~20 ms
        once warm (benchmarks/NOTES.md): that is start-up, paid here rather than by the
        first real batches. Both orientations and a larger size grow the library's and the
        allocator's buffers, and prepare the resize (weights, pass order) for those sizes, up front.
        """
        if self.jpeg is None:
            return
        photos = [
            photo_like_jpeg(h, w, seed, quality)
            for seed, (h, w, quality) in enumerate(
                ((480, 640, 95), (640, 480, 95), (960, 1280, 90), (1280, 960, 90))
            )
        ]
        payloads = [photos[i % len(photos)] for i in range(batch_size)]
        scratch = torch.empty((batch_size, 3, *self.pre.output_hw), device=self.device, dtype=self.dtype)
        for _ in range(calls):
            self(payloads, scratch).ready.synchronize()

    @property
    def stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            _, highest = torch.cuda.Stream.priority_range()
            stream = self._local.stream = torch.cuda.Stream(device=self.device, priority=highest)
        return stream

    def _to_device(self, values: list[int]) -> torch.Tensor:
        # Pinned + non_blocking: a pageable copy would block this thread until the stream drains.
        return torch.tensor(values, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)

    def _resize_group(self, images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(images).to(self.resize_dtype)
        h, w = self.pre.resize_hw(x.shape[-2], x.shape[-1])
        x = resize_like_pillow(x, (h, w), self.mode)
        if self.pre.crop:
            top, left = self.pre.crop_box(h, w)
            ch, cw = self.pre.crop
            x = x[:, :, top : top + ch, left : left + cw]
        return x

    def __call__(self, payloads: Sequence[bytes], out: torch.Tensor) -> DecodedBatch:
        """Decode into ``out`` (a (B,3,H,W) buffer on the device); returns the rows that are valid."""
        gpu_idx = [i for i, b in enumerate(payloads) if self.jpeg and nvjpeg_decodable(b)]
        gpu_set = set(gpu_idx)
        cpu_idx = [i for i in range(len(payloads)) if i not in gpu_set]
        errors: dict[int, str] = {}
        stream = self.stream
        with torch.cuda.stream(stream):
            decoded, keepalive = (
                self.jpeg.decode([payloads[i] for i in gpu_idx], stream) if gpu_idx else ([], None)
            )
            by_shape: dict[tuple[int, int], list[int]] = {}
            for pos, img in enumerate(decoded):
                if img is None:
                    cpu_idx.append(gpu_idx[pos])
                else:
                    by_shape.setdefault(tuple(img.shape[-2:]), []).append(pos)
            valid = [False] * len(payloads)
            for positions in by_shape.values():
                rows = self._to_device([gpu_idx[p] for p in positions])
                if self.resize is not None:
                    self.resize(torch.stack([decoded[p] for p in positions]), rows, out)
                else:
                    resized = self._resize_group([decoded[p] for p in positions])
                    out.index_copy_(0, rows, (resized.float() * self.mul + self.add).to(self.dtype))
                for p in positions:
                    valid[gpu_idx[p]] = True
            if cpu_idx:
                cpu_idx.sort()
                ok, arrays, errs = self.cpu.decode_arrays([payloads[i] for i in cpu_idx])
                errors.update({cpu_idx[k]: reason for k, reason in errs.items()})
                if arrays:
                    host = torch.from_numpy(np.stack(arrays)).pin_memory()
                    x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
                    rows = self._to_device([cpu_idx[k] for k in ok])
                    out.index_copy_(0, rows, (x * self.mul + self.add).to(self.dtype))
                    for k in ok:
                        valid[cpu_idx[k]] = True
            done = torch.cuda.Event()
            done.record(stream)
        return DecodedBatch(
            out,
            [i for i, v in enumerate(valid) if v],
            errors,
            rows_aligned=True,
            ready=done,
            keepalive=keepalive,
        )
