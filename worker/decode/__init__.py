"""Stage 3 — decode: bytes to a normalized pixel batch, following the model's image-processor config.

``spec.Preprocess`` is what the model's processor asks for; two decoders follow it:
- ``cpu.CpuDecoder``: Pillow, numerically the same steps as the Hugging Face PIL image
  processor (resize with its resample, rescale in float64, normalize in float32).
- ``gpu.GpuDecoder``: batched JPEG decode on the GPU (``jpeg``: nvjpeg on CUDA cores through
  torchvision, or the GPU's hardware JPEG engines through nvImageCodec), then Pillow's resize
  bit for bit and the normalize, as two Triton kernels per distinct input size
  (``pillow_resize``; torch's resize where Triton can't run). What neither JPEG decoder can
  read (PNG, WebP, CMYK, progressive JPEGs...) goes through Pillow and is copied in.
An image no decoder can read becomes an error, never a crash.
"""
