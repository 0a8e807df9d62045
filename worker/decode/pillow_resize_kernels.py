"""The Triton kernels behind ``worker.decode.pillow_resize.PillowResize`` (Pillow's fixed-point resample).

Both passes accumulate ``uint8 pixel * int32 weight`` from a rounding offset of half of
``1 << 22`` and clip ``acc >> 22`` to 0..255, as Pillow's ``ImagingResample*_8bpc`` do. The
final pass normalizes and writes the model's dtype into the rows of the batch buffer.
"""

import triton
import triton.language as tl


@triton.jit
def _finish(acc, dst, d_n, d_c, d_y, n, c, y, xs, live, rows, mul, add, FINAL: tl.constexpr):
    value = tl.minimum(tl.maximum(acc >> 22, 0), 255)
    if FINAL:  # normalize, and write the model's dtype into the batch buffer's row for image n
        target = tl.load(rows + n).to(tl.int64)
        scaled = value.to(tl.float32) * tl.load(mul + c) + tl.load(add + c)
        tl.store(dst + target * d_n + c * d_c + y * d_y + xs, scaled.to(dst.dtype.element_ty), mask=live)
    else:
        tl.store(dst + n.to(tl.int64) * d_n + c * d_c + y * d_y + xs, value.to(tl.uint8), mask=live)


@triton.jit
def _program(rows_per_plane, BLOCK: tl.constexpr):
    # Each program: one (image n, channel c, output row y) and BLOCK columns xs of it.
    prog = tl.program_id(0)
    n = prog // (3 * rows_per_plane)
    c = (prog // rows_per_plane) % 3
    y = prog % rows_per_plane
    xs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return n, c, y, xs


@triton.jit
def horizontal(
    src,
    s_n,
    s_c,
    s_y,
    s_x,
    first,
    weights,
    taps,
    width_out,
    height,
    dst,
    d_n,
    d_c,
    d_y,
    rows,
    mul,
    add,
    FINAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, c, y, xs = _program(height, BLOCK)
    live = xs < width_out
    x0 = tl.load(first + xs, mask=live, other=0)
    line = src + n.to(tl.int64) * s_n + c * s_c + y * s_y
    acc = tl.full((BLOCK,), 1 << 21, tl.int32)  # rounding: half of 1 << PRECISION_BITS
    for k in range(0, taps):
        w = tl.load(weights + xs * taps + k, mask=live, other=0)
        px = tl.load(line + (x0 + k) * s_x, mask=live & (w != 0), other=0)
        acc += px.to(tl.int32) * w
    _finish(acc, dst, d_n, d_c, d_y, n, c, y, xs, live, rows, mul, add, FINAL)


@triton.jit
def vertical(
    src,
    s_n,
    s_c,
    s_y,
    s_x,
    first,
    weights,
    taps,
    width,
    height_out,
    dst,
    d_n,
    d_c,
    d_y,
    rows,
    mul,
    add,
    FINAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, c, y, xs = _program(height_out, BLOCK)
    live = xs < width
    y0 = tl.load(first + y)
    plane = src + n.to(tl.int64) * s_n + c * s_c
    acc = tl.full((BLOCK,), 1 << 21, tl.int32)
    for k in range(0, taps):
        w = tl.load(weights + y * taps + k)
        if w != 0:
            px = tl.load(plane + (y0 + k) * s_y + xs * s_x, mask=live, other=0)
            acc += px.to(tl.int32) * w
    _finish(acc, dst, d_n, d_c, d_y, n, c, y, xs, live, rows, mul, add, FINAL)
