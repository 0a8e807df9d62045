"""What the model's image processor asks of the decoders: sizes, crop, resample, rescale, normalize."""

from __future__ import annotations

from dataclasses import dataclass

# Pillow's resample codes, as stored in preprocessor_config.json.
_NEAREST, _LANCZOS, _BILINEAR, _BICUBIC = 0, 1, 2, 3
TORCH_MODE = {_NEAREST: "nearest", _BILINEAR: "bilinear", _BICUBIC: "bicubic", _LANCZOS: "bicubic"}


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
