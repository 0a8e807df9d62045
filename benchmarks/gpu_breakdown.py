"""Where the GPU time goes: model variants, decode stages, decode+model overlap, and label drift.

Run on a GPU machine: ``python benchmarks/gpu_breakdown.py --workdir /tmp/bench``. It reuses the
images and model that ``python -m benchmarks.gpu_throughput`` generates there. Notes from runs are in
benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.classifier import make_dataset
from pipelines.dev.random_model import make_model
from worker.decode.cpu import CpuDecoder
from worker.decode.gpu import GpuDecoder
from worker.decode.jpeg import nvjpeg_decodable
from worker.decode.spec import load_preprocess
from worker.tasks.classification import load_model


def timed(fn, n_items: int, reps: int = 1) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return n_items * reps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--compile-modes", default="default,max-autotune-no-cudagraphs")
    args = p.parse_args()
    work = Path(args.workdir)
    paths = sorted((work / "images").rglob("*.jpg"))[: args.images]
    if len(paths) < args.images:
        paths = make_dataset(work / "images", args.images)
    model_dir = work / "vit-base-patch16-224-random"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
    dev = torch.device("cuda")
    B = args.batch
    pre = load_preprocess(str(model_dir))
    payloads = [p.read_bytes() for p in paths]
    model, _ = load_model(str(model_dir), dev)
    x = torch.randn(B, 3, 224, 224, device=dev, dtype=torch.bfloat16)
    iters = 20

    def forward(m):
        def f():
            for _ in range(iters):
                m(pixel_values=x).logits.float().softmax(-1).max(-1)

        return f

    with torch.inference_mode():
        forward(model)()
        print(f"model eager bf16: {timed(forward(model), B * iters):,.0f} img/s")
        for mode in [m for m in args.compile_modes.split(",") if m]:
            t0 = time.perf_counter()
            cm = torch.compile(model, mode=mode, dynamic=False)
            forward(cm)()
            print(
                f"model compile {mode}: {timed(forward(cm), B * iters):,.0f} img/s "
                f"(compile {time.perf_counter() - t0:.0f}s)"
            )

        from torchvision.io import ImageReadMode, decode_jpeg

        datas = [torch.frombuffer(b, dtype=torch.uint8) for b in payloads]
        decode_jpeg(datas[:B], mode=ImageReadMode.RGB, device=dev)

        def nvjpeg_only():
            for i in range(0, len(datas), B):
                decode_jpeg(datas[i : i + B], mode=ImageReadMode.RGB, device=dev)

        print(f"nvjpeg batched decode only: {timed(nvjpeg_only, len(datas)):,.0f} img/s")
        pool = ThreadPoolExecutor(os.cpu_count())
        gpu = GpuDecoder(pre, pool, dev)
        out = torch.empty(B, 3, 224, 224, device=dev, dtype=torch.bfloat16)

        def full_decode():
            for i in range(0, len(payloads), B):
                gpu(payloads[i : i + B], out)

        print(f"GpuDecoder (nvjpeg+resize+normalize): {timed(full_decode, len(payloads)):,.0f} img/s")
        gpu_half = GpuDecoder(pre, pool, dev, resize_dtype=torch.float16)

        def half_decode():
            for i in range(0, len(payloads), B):
                gpu_half(payloads[i : i + B], out)

        half_decode()
        print(f"GpuDecoder, fp16 resize: {timed(half_decode, len(payloads)):,.0f} img/s")
        outs = [torch.empty_like(out) for _ in range(4)]

        def threaded_decode(workers):
            def run():
                with ThreadPoolExecutor(workers) as ex:
                    list(
                        ex.map(
                            lambda i: (
                                torch.inference_mode().__enter__(),
                                gpu(payloads[i : i + B], outs[(i // B) % 4]),
                                torch.cuda.current_stream().synchronize(),
                            ),
                            range(0, len(payloads), B),
                        )
                    )

            return run

        for w in (2, 4):
            print(f"GpuDecoder, {w} threads: {timed(threaded_decode(w), len(payloads)):,.0f} img/s")
        t0 = time.perf_counter()
        n_checked = sum(1 for b in payloads if nvjpeg_decodable(b))
        print(
            f"header check: {len(payloads) / (time.perf_counter() - t0):,.0f} img/s ({n_checked} nvjpeg-able)"
        )

        # Overlap: decode in one thread on its own stream while the model runs in another.
        for name, m in [("eager", model)]:
            done = {}

            def dec_loop():
                with torch.inference_mode():
                    s = time.perf_counter()
                    full_decode()
                    torch.cuda.synchronize()
                    done["dec"] = len(payloads) / (time.perf_counter() - s)

            def model_loop():
                with torch.inference_mode():
                    s = time.perf_counter()
                    for _ in range(len(payloads) // B):
                        m(pixel_values=x).logits.float().softmax(-1).max(-1)
                    torch.cuda.synchronize()
                    done["model"] = len(payloads) / (time.perf_counter() - s)

            t1, t2 = threading.Thread(target=dec_loop), threading.Thread(target=model_loop)
            t1.start(), t2.start(), t1.join(), t2.join()
            print(f"overlap ({name}): decode {done['dec']:,.0f} img/s while model {done['model']:,.0f} img/s")

        # Label drift: which part of the fast path moves the argmax away from the fp32 reference?
        n = min(len(payloads), 4096)
        cpu = CpuDecoder(pre, pool)
        ref_model, _ = load_model(str(model_dir), torch.device("cpu"))
        ref_model = ref_model.to(dev)  # fp32 weights on the GPU
        torch.backends.cuda.matmul.allow_tf32 = False
        ref_logits, bf16_pil, fp32_gpu, bf16_gpu, autocast_gpu = [], [], [], [], []
        for i in range(0, n, B):
            d = cpu(payloads[i : i + B])
            pix = d.pixels.to(dev)
            ref_logits.append(ref_model(pixel_values=pix).logits.float())
            bf16_pil.append(model(pixel_values=pix.bfloat16()).logits.argmax(-1))
            g = gpu(payloads[i : i + B], out)
            torch.cuda.synchronize()
            gp = g.pixels[: len(d.ok)]
            fp32_gpu.append(ref_model(pixel_values=gp.float()).logits.argmax(-1))
            bf16_gpu.append(model(pixel_values=gp).logits.argmax(-1))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                autocast_gpu.append(ref_model(pixel_values=gp.float()).logits.argmax(-1))
        ref = torch.cat(ref_logits)
        ref_label = ref.argmax(-1)
        top2 = ref.softmax(-1).topk(2, dim=-1).values
        for name, got in [
            ("bf16 model, Pillow pixels", bf16_pil),
            ("fp32 model, GPU pixels", fp32_gpu),
            ("bf16 model, GPU pixels", bf16_gpu),
            ("autocast fp32 weights, GPU pixels", autocast_gpu),
        ]:
            agree = (torch.cat(got) == ref_label).float().mean().item()
            print(f"agreement {name}: {100 * agree:.2f} %")
        margin = top2[:, 0] - top2[:, 1]
        print(
            f"reference top-1 prob median {top2[:, 0].median():.4f}; top1-top2 prob margin median "
            f"{margin.median():.2e}, 10th pct {margin.quantile(0.1):.2e}"
        )


if __name__ == "__main__":
    main()
