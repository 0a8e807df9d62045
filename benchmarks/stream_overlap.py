"""Why does GPU JPEG decode slow down beside the model? Streams, host-side waits, SM partitions.

``PYTHONPATH=. python benchmarks/stream_overlap.py --workdir /tmp/bench`` (images and model as
``benchmarks/decoder_survey.py`` makes them). Prints, one line each:

- the model and a decoder free-running in two threads, with the model on the legacy default
  stream or on a stream of its own, paced or not: both rates;
- for the same pairs, the CUDA API calls the decode thread spent its time in (torch.profiler),
  which shows whether it waits in a stream sync, a cudaFree or a synchronous copy;
- the model alone on a green context of N SMs, and beside a decoder, where torch has them.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time
import traceback
from pathlib import Path

import torch

from benchmarks.classifier import make_dataset
from benchmarks.decoder_survey import DEV, nvimg_decoder, nvimg_tensors, resize_u8
from pipelines.dev.random_model import make_model
from worker.decode.spec import load_preprocess
from worker.tasks.classification import load_model

WINDOW_S = 5.0


class Pacer:
    """At most two encoder blocks queued ahead of the host, as the worker's BlockPacer."""

    def __init__(self, model):
        self.on = False
        self.events: collections.deque = collections.deque()
        blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
        for block in blocks:
            block.register_forward_hook(self.after_block)

    def after_block(self, *_):
        if self.on:
            event = torch.cuda.Event()
            event.record()
            self.events.append(event)
            if len(self.events) > 2:
                self.events.popleft().synchronize()


def decoders(payloads, batch):
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(b, dtype=torch.uint8) for b in payloads]
    hw = nvimg_decoder("hw")

    def torchvision_nvjpeg(i, stream):
        return decode_jpeg(datas[i : i + batch], mode=ImageReadMode.RGB, device=DEV)

    def hardware(i, stream):
        return [a.permute(2, 0, 1) for a in nvimg_tensors(hw, payloads[i : i + batch], stream)[0]]

    return {"torchvision nvjpeg": torchvision_nvjpeg, "nvimgcodec hardware": hardware}


def side_by_side(model, x, decode, pre, n, batch, model_stream, profile=False):
    """Both loops for WINDOW_S seconds: (model img/s, decode img/s, decode thread's API time)."""
    _, highest = torch.cuda.Stream.priority_range()
    dstream = torch.cuda.Stream(priority=highest)
    stop = threading.Event()
    counts = {"model": 0, "decode": 0}
    tids = {}

    def model_loop():
        tids["model"] = threading.get_native_id()
        with torch.inference_mode(), torch.cuda.stream(model_stream):  # None: the legacy default stream
            while not stop.is_set():
                model(pixel_values=x).logits.float().argmax(-1).cpu()
                counts["model"] += batch

    def decode_loop():
        tids["decode"] = threading.get_native_id()
        with torch.cuda.stream(dstream), torch.inference_mode():
            i = 0
            while not stop.is_set():
                chw = decode(i, dstream)
                resize_u8(chw, pre, True)
                dstream.synchronize()
                counts["decode"] += batch
                i = (i + batch) % (n - batch)

    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        prof.__enter__()
    threads = [threading.Thread(target=model_loop), threading.Thread(target=decode_loop)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(WINDOW_S if not profile else 2.0)  # a fixed measuring window for two free-running loops
    stop.set()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    api = {}
    if prof is not None:
        prof.__exit__(None, None, None)
        api = profile_summary(prof, {v: k for k, v in tids.items()}, dt)
    return counts["model"] / dt, counts["decode"] / dt, api


def profile_summary(prof, thread_names: dict[int, str], seconds: float) -> dict[str, list]:
    """Per thread: the CUDA API calls it spent most time in; per stream: kernel busy time."""
    from torch.autograd import DeviceType

    api: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kernels: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ev in prof.profiler.kineto_results.events():
        name = ev.name()
        if ev.device_type() == DeviceType.CUDA:
            kernels[f"stream {ev.device_resource_id()}"][name[:60]] += ev.duration_ns() / 1e9
        elif name.startswith(("cuda", "cu")):
            who = thread_names.get(ev.start_thread_id(), f"thread {ev.start_thread_id()}")
            api[f"{who} thread CUDA API"][name] += ev.duration_ns() / 1e9
    out = {k: c.most_common(5) for k, c in api.items()}
    for stream, c in kernels.items():
        out[f"{stream} kernels, busy {sum(c.values()) / seconds:.0%} of the window"] = c.most_common(4)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--green-sms", default="132,124,116,108,100")
    p.add_argument("--sections", default="pairs,profile,gil,green")
    args = p.parse_args()
    work = Path(args.workdir)
    paths = sorted((work / "images").rglob("*.jpg"))
    if len(paths) < args.images:
        paths = make_dataset(work / "images", args.images)
    paths = paths[: args.images]
    model_dir = work / "vit-base-patch16-224-random"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
    pre = load_preprocess(str(model_dir))
    payloads = [p.read_bytes() for p in paths]
    model, _ = load_model(str(model_dir), DEV)
    pacer = Pacer(model)
    x = torch.randn(args.batch, 3, 224, 224, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            model(pixel_values=x)
    torch.cuda.synchronize()
    own = torch.cuda.Stream()
    for dec_name, decode in decoders(payloads, args.batch).items():
        decode(0, torch.cuda.current_stream())
        for stream_name, stream in (("legacy default stream", None), ("own stream", own)):
            for paced in (False, True) if "pairs" in args.sections else ():
                pacer.on = paced
                m, d, _ = side_by_side(model, x, decode, pre, len(payloads), args.batch, stream)
                print(
                    f"{dec_name:20s} model on {stream_name:21s} {'paced' if paced else 'unpaced':8s}: "
                    f"model {m:7,.0f} img/s, decode+resize {d:7,.0f} img/s",
                    flush=True,
                )
            pacer.on = False
            if "profile" not in args.sections:
                continue
            try:
                m, d, api = side_by_side(
                    model, x, decode, pre, len(payloads), args.batch, stream, profile=True
                )
            except Exception:  # any failure of one setting is a diagnostic line; the others still run
                traceback.print_exc()
                continue
            for who, calls in api.items():
                print(
                    f"  profiled 2 s ({dec_name}, model on {stream_name}), {who}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in calls),
                    flush=True,
                )
    if "gil" in args.sections:
        gil_contention(decoders(payloads, args.batch), pre, len(payloads), args.batch)
    if "green" in args.sections:
        green(
            model,
            x,
            decoders(payloads, args.batch),
            pre,
            len(payloads),
            args.batch,
            [int(s) for s in args.green_sms.split(",")],
        )


def gil_contention(decs, pre, n, batch):
    """Decode alone, then beside a thread that only runs Python: what the GIL alone costs it."""
    for dec_name, decode in decs.items():
        line = f"{dec_name} decode+resize alone"
        for spinners in (0, 1):
            stop = threading.Event()

            def spin():
                while not stop.is_set():
                    sum(range(1000))

            threads = [threading.Thread(target=spin) for _ in range(spinners)]
            for t in threads:
                t.start()
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.inference_mode():
                t0, done, i = time.perf_counter(), 0, 0
                while time.perf_counter() - t0 < WINDOW_S:
                    resize_u8(decode(i, stream), pre, True)
                    stream.synchronize()
                    done += batch
                    i = (i + batch) % (n - batch)
                rate_ = done / (time.perf_counter() - t0)
            stop.set()
            for t in threads:
                t.join()
            line += f"{'' if not spinners else ', beside a Python busy loop'} {rate_:7,.0f} img/s"
        print(line, flush=True)


def green(model, x, decs, pre, n, batch, sm_counts):
    try:
        from torch.cuda.green_contexts import GreenContext
    except ImportError as exc:
        print(f"green contexts: not in this torch ({exc})", flush=True)
        return
    total = torch.cuda.get_device_properties(DEV).multi_processor_count
    for sms in sm_counts:
        try:
            ctx = GreenContext.create(num_sms=sms, device_id=DEV.index or 0)
            stream = ctx.Stream()
        except Exception as exc:  # green contexts are new and fail in many ways: a survey line each
            print(f"green context of {sms} SMs: {type(exc).__name__}: {exc}", flush=True)
            continue
        with torch.inference_mode(), torch.cuda.stream(stream):
            model(pixel_values=x)
            stream.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                model(pixel_values=x).logits.float().argmax(-1)
            stream.synchronize()
            alone = 20 * batch / (time.perf_counter() - t0)
        line = f"green context {sms}/{total} SMs: model alone {alone:7,.0f} img/s"
        for dec_name, decode in decs.items():
            m, d, _ = side_by_side(model, x, decode, pre, n, batch, stream)
            line += f"; beside {dec_name}: model {m:7,.0f}, decode {d:7,.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
