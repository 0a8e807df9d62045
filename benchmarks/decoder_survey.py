"""Survey of JPEG decoders and model precisions on a GPU machine (issue 6's open leads).

``python benchmarks/decoder_survey.py --workdir /tmp/bench`` reuses (or makes) the images and
the fine-tuned random-weight model of ``python -m benchmarks.gpu_throughput`` and prints, one line each:

- decode throughput alone: torchvision nvjpeg, nvImageCodec's hardware engine (NVJPG), its
  CUDA decoder, and Pillow / OpenCV on all CPU cores (full size, and DCT-scaled);
- the hardware decoder running beside the model: both rates;
- pixel fidelity against Pillow (mean |diff| of the resized uint8 images) and the fp32
  model's label agreement on each decoder's pixels;
- the arithmetic: label agreement with fp32 of pure bf16, autocast bf16, and the feature spread.

Each section is independent; a failing one prints its error and the rest go on.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.classifier import bench_images, trained_model
from worker.decode.cpu import pil_resized
from worker.decode.gpu import resize_like_pillow
from worker.decode.spec import Preprocess, load_preprocess

DEV = torch.device("cuda")


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception:  # a survey goes on past a broken probe, whatever broke it
                print(f"[{name}] FAILED\n{traceback.format_exc()}", flush=True)
            print(f"[{name}] took {time.perf_counter() - t0:.1f}s", flush=True)

        return run

    return wrap


def rate(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


PREALLOCATE = (
    "nvjpeg_hw_decoder:preallocate_buffers=true nvjpeg_hw_decoder:preallocate_batch_size=256 "
    "nvjpeg_hw_decoder:preallocate_width_hint=640 nvjpeg_hw_decoder:preallocate_height_hint=640"
)


def nvimg_decoder(kind: str, options: str = "", cpu_share: float = 0.0):
    from nvidia import nvimgcodec as nv

    backend = {
        "hw": nv.BackendKind.HW_GPU_ONLY,
        "cuda": nv.BackendKind.GPU_ONLY,
        "hybrid": nv.BackendKind.HYBRID_CPU_GPU,
        "cpu": nv.BackendKind.CPU_ONLY,
    }[kind]
    backends = [nv.Backend(backend)]
    if cpu_share:
        backends = [nv.Backend(backend, load_hint=1.0 - cpu_share), nv.Backend(nv.BackendKind.CPU_ONLY)]
    return nv.Decoder(device_id=DEV.index or 0, backends=backends, options=options)


def nvimg_tensors(decoder, payloads, stream=None):
    from nvidia import nvimgcodec as nv

    s = stream or torch.cuda.current_stream()
    imgs = decoder.decode([nv.CodeStream(b) for b in payloads], cuda_stream=s.cuda_stream)
    host = nv.ImageBufferKind.STRIDED_HOST
    return [
        None
        if im is None
        else torch.from_numpy(np.asarray(im.cpu()))
        if im.buffer_kind == host
        else torch.as_tensor(im, device=DEV)
        for im in imgs
    ], imgs


def resize_u8(chw_list, pre: Preprocess, rounded) -> torch.Tensor:
    """Resize to the model's size, one launch per input shape; rows keep the input order.

    ``rounded``: False (one float pass), True (one pass, rounded) or "two-pass" (the worker's
    ``resize_like_pillow``).
    """
    out = torch.empty((len(chw_list), 3, pre.output_hw[0], pre.output_hw[1]), device=DEV)
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(chw_list):
        groups.setdefault(tuple(a.shape), []).append(i)
    for idx in groups.values():
        x = torch.stack([chw_list[i] for i in idx]).float()
        if rounded == "two-pass":
            out[idx] = resize_like_pillow(x, (pre.output_hw[0], pre.output_hw[1]), "bilinear")
            continue
        x = F.interpolate(
            x, size=(pre.output_hw[0], pre.output_hw[1]), mode="bilinear", antialias=True, align_corners=False
        )
        out[idx] = x.round_().clamp_(0, 255) if rounded else x
    return out


@section("decode alone")
def decode_alone(payloads, batch):
    from torchvision.io import ImageReadMode, decode_jpeg

    n = len(payloads)
    datas = [torch.frombuffer(b, dtype=torch.uint8) for b in payloads]

    def tv():
        for i in range(0, n, batch):
            decode_jpeg(datas[i : i + batch], mode=ImageReadMode.RGB, device=DEV)

    tv()
    print(f"torchvision nvjpeg batched: {rate(tv, n):,.0f} img/s", flush=True)
    for kind, opts, share in (
        ("hw", "", 0),
        ("hw", PREALLOCATE, 0),
        ("cpu", "", 0),
        ("hw", PREALLOCATE, 0.2),
        ("hw", PREALLOCATE, 0.35),
    ):
        kind_name = f"{kind}{' preallocated' if opts else ''}{f' + cpu {share}' if share else ''}"
        try:
            dec = nvimg_decoder(kind, opts, share)

            def go():
                for i in range(0, n, batch):
                    nvimg_tensors(dec, payloads[i : i + batch])

            go()
            t, _ = nvimg_tensors(dec, payloads[:4])
            print(
                f"nvimgcodec {kind_name}: {rate(go, n):,.0f} img/s  (shape {tuple(t[0].shape)}, {t[0].dtype})",
                flush=True,
            )
        except Exception as exc:  # nvImageCodec's errors have no common type: a survey line each
            print(f"nvimgcodec {kind_name}: failed: {exc}", flush=True)


@section("cpu decoders")
def cpu_decoders(payloads, pre):
    import cv2

    n = min(len(payloads), 8192)
    cores = os.cpu_count()

    def pil_draft(b):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(b)) as im:
            im.draft("RGB", (pre.output_hw[1], pre.output_hw[0]))
            return np.asarray(im.convert("RGB").resize((pre.output_hw[1], pre.output_hw[0]), Image.BILINEAR))

    def cv_reduced(b):
        a = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
        return cv2.resize(a, (pre.output_hw[1], pre.output_hw[0]), interpolation=cv2.INTER_AREA)

    def cv_full(b):
        a = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        return cv2.resize(a, (pre.output_hw[1], pre.output_hw[0]), interpolation=cv2.INTER_AREA)

    cv2.setNumThreads(1)
    for name, fn in [
        ("pillow exact", lambda b: pil_resized(b, pre)),
        ("pillow draft", pil_draft),
        ("opencv full", cv_full),
        ("opencv reduced_2", cv_reduced),
    ]:
        with ThreadPoolExecutor(cores) as pool:
            t0 = time.perf_counter()
            list(pool.map(fn, payloads[:n], chunksize=32))
            print(f"{name}, {cores} threads: {n / (time.perf_counter() - t0):,.0f} img/s", flush=True)


@section("decode beside the model")
def overlap(payloads, model, pre, batch):
    from torchvision.io import ImageReadMode, decode_jpeg

    n = len(payloads)
    x = torch.randn(batch, 3, 224, 224, device=DEV, dtype=torch.bfloat16)
    datas = [torch.frombuffer(b, dtype=torch.uint8) for b in payloads]
    hw = nvimg_decoder("hw")
    hw_pre = nvimg_decoder("hw", PREALLOCATE)
    hw_cpu = nvimg_decoder("hw", PREALLOCATE, 0.3)
    _, highest = torch.cuda.Stream.priority_range()
    dstream = torch.cuda.Stream(priority=highest)

    def decode_hw(i):
        return [a.permute(2, 0, 1) for a in nvimg_tensors(hw, payloads[i : i + batch], dstream)[0]]

    reuse = {"images": None}

    def decode_hw_reuse(i):
        from nvidia import nvimgcodec as nv

        imgs = hw.decode(
            [nv.CodeStream(b) for b in payloads[i : i + batch]],
            images=reuse["images"],
            cuda_stream=dstream.cuda_stream,
        )
        reuse["images"] = imgs
        return [torch.as_tensor(im, device=DEV).permute(2, 0, 1) for im in imgs]

    def decode_hw_pre(i):
        return [a.permute(2, 0, 1) for a in nvimg_tensors(hw_pre, payloads[i : i + batch], dstream)[0]]

    def decode_hw_cpu(i):
        return [
            a.to(DEV).permute(2, 0, 1) for a in nvimg_tensors(hw_cpu, payloads[i : i + batch], dstream)[0]
        ]

    def decode_tv(i):
        return decode_jpeg(datas[i : i + batch], mode=ImageReadMode.RGB, device=DEV)

    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    print(f"pacing hooks on {len(layers)} blocks", flush=True)
    pace = {"on": False, "events": []}

    def after_layer(mod, inp, out):
        # Keep at most two layers queued ahead: other streams' kernels then wait ~2 layers, not a forward.
        if pace["on"]:
            ev = torch.cuda.Event()
            ev.record()
            pace["events"].append(ev)
            if len(pace["events"]) > 2:
                pace["events"].pop(0).synchronize()

    for layer in layers:
        layer.register_forward_hook(after_layer)
    for name, decode, paced in (
        ("nvimgcodec hw", decode_hw, False),
        ("nvimgcodec hw, paced model", decode_hw, True),
        ("torchvision nvjpeg", decode_tv, False),
        ("torchvision nvjpeg, paced model", decode_tv, True),
    ):
        pace["on"] = paced
        stop = threading.Event()
        counts = {"model": 0, "decode": 0}

        def model_loop():
            with torch.inference_mode():
                while not stop.is_set():
                    model(pixel_values=x).logits.float().argmax(-1).cpu()
                    counts["model"] += batch

        spent = {"decode call": 0.0, "resize enqueue": 0.0, "stream sync": 0.0, "free": 0.0}

        def decode_loop():
            with torch.cuda.stream(dstream), torch.inference_mode():
                i = 0
                while not stop.is_set():
                    t0 = time.perf_counter()
                    chw = decode(i)
                    t1 = time.perf_counter()
                    resize_u8(chw, pre, True)
                    t2 = time.perf_counter()
                    dstream.synchronize()
                    t3 = time.perf_counter()
                    del chw
                    t4 = time.perf_counter()
                    for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=False):
                        spent[key] += dt
                    counts["decode"] += batch
                    i = (i + batch) % (n - batch)

        ts = [threading.Thread(target=model_loop), threading.Thread(target=decode_loop)]
        t0 = time.perf_counter()
        [t.start() for t in ts]
        time.sleep(6.0)  # a fixed measuring window for two free-running loops
        stop.set()
        [t.join() for t in ts]
        dt = time.perf_counter() - t0
        print(
            f"together: model {counts['model'] / dt:,.0f} img/s, {name} decode+resize "
            f"{counts['decode'] / dt:,.0f} img/s; decode thread's seconds: "
            + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()),
            flush=True,
        )
    for paced in (False, True):
        pace["on"] = paced
        with torch.inference_mode():

            def f():
                for _ in range(20):
                    model(pixel_values=x).logits.float().softmax(-1).max(-1)

            f()
            print(
                f"model only, {'paced' if paced else 'not paced'}: {rate(f, 20 * batch):,.0f} img/s",
                flush=True,
            )


@torch.inference_mode()
def fp32_labels(model32, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [model32(pixel_values=pixels[i : i + 128]).logits.argmax(-1) for i in range(0, len(pixels), 128)]
    )


def normalize(u8_nchw: torch.Tensor) -> torch.Tensor:
    return (u8_nchw.float() / 255.0 - 0.5) / 0.5


@section("pixel fidelity")
def fidelity(payloads, pre, model32):
    from torchvision.io import ImageReadMode, decode_jpeg

    n = min(len(payloads), 4096)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        ref = torch.from_numpy(np.stack(list(pool.map(lambda b: pil_resized(b, pre), payloads[:n]))))
    ref = ref.permute(0, 3, 1, 2).to(DEV)
    ref_labels = fp32_labels(model32, normalize(ref))

    def report(name, decoded_chw):
        for rounded in (False, True, "two-pass"):
            out = torch.cat([resize_u8(decoded_chw[i : i + 256], pre, rounded) for i in range(0, n, 256)])
            diff = (out - ref.float()).abs()
            agree = (fp32_labels(model32, normalize(out)) == ref_labels).float().mean().item()
            print(
                f"{name}{f' {rounded}' if rounded == 'two-pass' else ' rounded' if rounded else ''}: mean|diff| {diff.mean().item():.3f}, "
                f"max {diff.max().item():.0f}, fp32 agreement {100 * agree:.2f} %",
                flush=True,
            )

    datas = [torch.frombuffer(b, dtype=torch.uint8) for b in payloads[:n]]
    tv = []
    for i in range(0, n, 256):
        tv += decode_jpeg(datas[i : i + 256], mode=ImageReadMode.RGB, device=DEV)
    report("torchvision nvjpeg", tv)
    for kind, opts in (("hw", ""),):
        try:
            dec = nvimg_decoder(kind, opts)
            chw = []
            keep = []
            for i in range(0, n, 256):
                t, imgs = nvimg_tensors(dec, payloads[i : i + 256])
                keep.append(imgs)
                chw += [a.to(DEV).permute(2, 0, 1) for a in t]
            torch.cuda.synchronize()
            report(f"nvimgcodec {kind} {opts}", chw)
        except Exception as exc:  # nvImageCodec's errors have no common type: a survey line each
            print(f"nvimgcodec {kind} {opts}: failed: {exc}", flush=True)
    # Pillow decode, GPU resize: isolates the resize's share.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        import io

        from PIL import Image

        def full(b):
            with Image.open(io.BytesIO(b)) as im:
                return np.asarray(im.convert("RGB"))

        report(
            "pillow decode + torch resize",
            [torch.from_numpy(a).to(DEV).permute(2, 0, 1) for a in pool.map(full, payloads[:n])],
        )


@section("arithmetic")
def arithmetic(payloads, pre, model_dir, model32):
    from transformers import AutoModelForImageClassification

    n = len(payloads)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        ref = torch.from_numpy(np.stack(list(pool.map(lambda b: pil_resized(b, pre), payloads[:n]))))
    px = normalize(ref.permute(0, 3, 1, 2).to(DEV))
    with torch.inference_mode():
        logits32 = torch.cat([model32(pixel_values=px[i : i + 128]).logits for i in range(0, n, 128)])
        feats = torch.cat(
            [model32.vit(pixel_values=px[i : i + 128]).last_hidden_state[:, 0] for i in range(0, n, 128)]
        )
    lab32 = logits32.argmax(-1)
    top2 = logits32.float().softmax(-1).topk(2, -1).values
    print(
        f"fp32: median top-1 prob {top2[:, 0].median().item():.3f}, feature spread "
        f"(centred std / mean norm) {(feats - feats.mean(0)).norm(dim=-1).mean().item() / feats.mean(0).norm().item():.4f}",
        flush=True,
    )
    m16 = (
        AutoModelForImageClassification.from_pretrained(
            str(model_dir), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
        .eval()
        .to(DEV)
    )
    with torch.inference_mode():
        lab16 = torch.cat(
            [m16(pixel_values=px[i : i + 256].bfloat16()).logits.argmax(-1) for i in range(0, n, 256)]
        )
        m32s = (
            AutoModelForImageClassification.from_pretrained(
                str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
            )
            .eval()
            .to(DEV)
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lab_ac = torch.cat(
                [m32s(pixel_values=px[i : i + 256]).logits.argmax(-1) for i in range(0, n, 256)]
            )
        m16h = (
            AutoModelForImageClassification.from_pretrained(
                str(model_dir), dtype=torch.float16, attn_implementation="sdpa"
            )
            .eval()
            .to(DEV)
        )
        lab_h = torch.cat(
            [m16h(pixel_values=px[i : i + 256].half()).logits.argmax(-1) for i in range(0, n, 256)]
        )
        # bf16 encoder with the patch embedding (pixels included) and/or the final norm + head in fp32.
        variants = {}
        for name, fp32_parts in (
            ("bf16, fp32 classifier", ("classifier",)),
            ("bf16, fp32 norm+head", ("head",)),
            ("bf16, fp32 embeddings+norm+head", ("embeddings", "head")),
        ):
            m = (
                AutoModelForImageClassification.from_pretrained(
                    str(model_dir), dtype=torch.bfloat16, attn_implementation="sdpa"
                )
                .eval()
                .to(DEV)
            )
            first_dtype = torch.bfloat16
            if "embeddings" in fp32_parts:
                m.vit.embeddings.float()
                m.vit.embeddings.register_forward_hook(lambda mod, inp, out: out.bfloat16())
                first_dtype = torch.float32
            if "head" in fp32_parts:
                m.vit.layernorm.float()
                m.classifier.float()
                m.vit.layernorm.register_forward_pre_hook(lambda mod, args: (args[0].float(),))
            if "classifier" in fp32_parts:
                m.classifier.float()
                m.classifier.register_forward_pre_hook(lambda mod, args: (args[0].float(),))
            variants[name] = (m, first_dtype)
        labs = {
            name: torch.cat(
                [m(pixel_values=px[i : i + 256].to(dt)).logits.argmax(-1) for i in range(0, n, 256)]
            )
            for name, (m, dt) in variants.items()
        }
    for name, lab in (("pure bf16", lab16), ("autocast bf16", lab_ac), ("pure fp16", lab_h), *labs.items()):
        print(
            f"{name} vs fp32 on the same pixels: {100 * (lab == lab32).float().mean().item():.2f} %",
            flush=True,
        )

    x = torch.randn(256, 3, 224, 224, device=DEV)

    def fwd(m, dtype, ac):
        def f():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=ac):
                for _ in range(20):
                    m(pixel_values=x.to(dtype)).logits.float().softmax(-1).max(-1)

        return f

    for name, m, dtype, ac in (
        ("pure bf16", m16, torch.bfloat16, False),
        ("autocast bf16", m32s, torch.float32, True),
        ("pure fp16", m16h, torch.float16, False),
        *((k, m, dt, False) for k, (m, dt) in variants.items()),
    ):
        fwd(m, dtype, ac)()
        print(f"model only, {name}: {rate(fwd(m, dtype, ac), 20 * 256):,.0f} img/s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sections", default="decode,cpu,overlap,fidelity,arithmetic")
    args = p.parse_args()
    work = Path(args.workdir)
    paths = bench_images(work / "images", args.images)
    model_dir, _ = trained_model(work, paths, DEV, epochs=3)  # as python -m benchmarks.gpu_throughput does
    pre = load_preprocess(str(model_dir))
    payloads = [p.read_bytes() for p in paths]
    from transformers import AutoModelForImageClassification

    from worker.tasks.classification import load_model

    model32 = (
        AutoModelForImageClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(DEV)
    )
    todo = args.sections.split(",")
    if "decode" in todo:
        decode_alone(payloads, args.batch)
    if "cpu" in todo:
        cpu_decoders(payloads, pre)
    if "overlap" in todo:
        model, _ = load_model(str(model_dir), DEV)
        overlap(payloads, model, pre, args.batch)
    if "fidelity" in todo:
        fidelity(payloads, pre, model32)
    if "arithmetic" in todo:
        arithmetic(payloads, pre, model_dir, model32)


if __name__ == "__main__":
    main()
