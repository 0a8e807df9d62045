"""The GPU path's parts that run on a CPU too: Pillow-exact resize, the fp32 head, block pacing, config.

The GPU-only parts (nvjpeg, the hardware JPEG engines, CUDA events) are measured by
``python -m worker.bench`` on a GPU machine; benchmarks/NOTES.md holds the figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worker.config import WorkerConfig, parse_args
from worker.decode import resize_like_pillow
from worker.model import keep_classifier_in_fp32
from worker.run import BlockPacer


def _photo_like(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (97, 301)])
@pytest.mark.parametrize("mode,resample", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_resize_like_pillow_matches_pillow(shape, mode, resample):
    img = _photo_like(*shape, seed=sum(shape))
    expected = np.asarray(Image.fromarray(img).resize((224, 224), resample, reducing_gap=None)).astype(
        np.float64
    )
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    got = resize_like_pillow(x, (224, 224), mode)[0].permute(1, 2, 0).numpy()
    diff = np.abs(got - expected)
    one_pass = (
        torch.nn.functional.interpolate(x, size=(224, 224), mode=mode, antialias=True, align_corners=False)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    # Off by one level on a few pixels at most (Pillow's fixed-point weights), where a
    # single float pass is off on average by a quarter level.
    assert diff.max() <= 1
    assert diff.mean() < 0.03
    assert np.abs(one_pass - expected).mean() > 5 * diff.mean()


def test_classifier_runs_in_fp32_on_bf16_features(tiny_model):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(tiny_model), dtype=torch.bfloat16).eval()
    keep_classifier_in_fp32(model)
    assert model.classifier.weight.dtype == torch.float32
    assert next(model.vit.parameters()).dtype == torch.bfloat16
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        logits = model(pixel_values=pixels.bfloat16()).logits
        features = model.vit(pixel_values=pixels.bfloat16()).last_hidden_state[:, 0]
        expected = features.float() @ model.classifier.weight.T + model.classifier.bias
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected)


def test_block_pacer_hooks_every_encoder_block(tiny_model):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(tiny_model))
    pacer = BlockPacer(model, depth=2)
    assert len(pacer.handles) == model.config.num_hidden_layers
    assert BlockPacer(model, depth=0).handles == []


def test_gpu_flags_round_trip_and_validate(tmp_path):
    cfg = parse_args(
        [
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
            "--model",
            "m",
            "--gpu-jpeg",
            "hardware",
            "--queued-blocks",
            "0",
        ]
    )
    assert (cfg.gpu_jpeg, cfg.queued_blocks) == ("hardware", 0)
    assert parse_args(cfg.to_args()) == cfg
    with pytest.raises(ValueError, match="--gpu-jpeg"):
        WorkerConfig(input=str(tmp_path), output=str(tmp_path), model="m", gpu_jpeg="auto")
    with pytest.raises(ValueError, match="--queued-blocks"):
        WorkerConfig(input=str(tmp_path), output=str(tmp_path), model="m", queued_blocks=-1)


def test_capture_mask_override_drops_only_the_all_visible_mask(tiny_model):
    from transformers import AutoModelForImageClassification, masking_utils

    from worker.cuda_graph import unpadded_attention_without_mask

    model = AutoModelForImageClassification.from_pretrained(
        str(tiny_model), attn_implementation="sdpa"
    ).eval()
    table = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    impl = model.config._attn_implementation
    original = table[impl]
    # What a version that counts stream capture as tracing asks for: the skip not allowed.
    request = dict(
        batch_size=2,
        q_length=5,
        kv_length=5,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        device="cpu",
    )
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert original(mask_function=masking_utils.bidirectional_mask_function, **request) is not None
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(pixel_values=pixels).logits
        with unpadded_attention_without_mask(model):
            assert table[impl](mask_function=masking_utils.bidirectional_mask_function, **request) is None
            padded = table[impl](
                mask_function=masking_utils.bidirectional_mask_function, attention_mask=padding, **request
            )
            causal = table[impl](mask_function=masking_utils.causal_mask_function, **request)
            got = model(pixel_values=pixels).logits
    assert not padded[0, 0, 0, 3:].any() and padded[1].all()
    assert causal is not None and not causal[0, 0, 0, 1:].any()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert table[impl] is original and impl not in table._local_mapping


def test_utilization_counts_only_the_time_spent_waiting_for_input():
    from worker.run import Utilization

    now = [0.0]
    waits = [3.0, 0.5, 2.0]  # how long each item takes to arrive; the last wait ends the iteration

    def producer():
        for i, wait in enumerate(waits[:-1]):
            now[0] += wait
            yield i
        now[0] += waits[-1]

    utilization = Utilization(clock=lambda: now[0])
    seen = []
    for item in utilization.waiting(producer()):
        now[0] += 10.0  # the consumer's own work is not waiting
        seen.append(item)
    assert seen == [0, 1]
    assert utilization.input_wait_seconds == sum(waits)


def test_same_decisions_accepts_near_ties_and_rejects_a_wrong_forward():
    from worker.cuda_graph import same_decisions

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=gen) * 3
    scores, labels = logits.softmax(-1).max(-1)
    assert same_decisions(logits, scores, labels)
    # A near-tie decided the other way (a fused kernel's rounding) still makes the same decision.
    tied = logits.clone()
    runner_up = tied[0].topk(2).indices[1]
    tied[0, runner_up] = tied[0].max() - 1e-3
    flipped = labels.clone()
    flipped[0] = runner_up
    assert same_decisions(tied, tied.softmax(-1).max(-1).values, flipped)
    # Another input's decisions (a stale buffer) fail: on labels, and on scores alone.
    other = torch.randn(200, 50, generator=gen) * 3
    other_scores, other_labels = other.softmax(-1).max(-1)
    assert not same_decisions(logits, other_scores, other_labels)
    assert not same_decisions(logits, (scores + 0.2).clamp(max=1), labels)


def test_compile_choices_are_the_compile_modes():
    from worker.config import COMPILE_CHOICES
    from worker.cuda_graph import COMPILE_MODES

    assert tuple(COMPILE_MODES) == COMPILE_CHOICES
    with pytest.raises(ValueError, match="--compile"):
        WorkerConfig(input="in", output="out", model="m", compile="fast")
    assert (
        parse_args(["--input", "i", "--output", "o", "--model", "m", "--compile", "none"]).compile == "none"
    )


def test_compiled_forward_traces_attention_without_a_mask(tiny_model):
    """The compiled candidate of ``fastest_graph``: traced under the override, SDPA gets no mask
    (so the fused kernels stay eligible) and the logits are the eager forward's."""
    from transformers import AutoModelForImageClassification

    from worker.cuda_graph import unpadded_attention_without_mask

    model = AutoModelForImageClassification.from_pretrained(
        str(tiny_model), attn_implementation="sdpa"
    ).eval()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    pixels = torch.randn(2, 3, 32, 32)
    torch.compiler.reset()
    compiled = torch.compile(lambda x: model(pixel_values=x).logits, backend=recording_backend, dynamic=False)
    with torch.inference_mode():
        expected = model(pixel_values=pixels).logits
        with unpadded_attention_without_mask(model):
            got = compiled(pixels)
    attention = [node for g in graphs for node in g.graph.nodes if "scaled_dot_product" in str(node.target)]
    assert len(attention) == model.config.num_hidden_layers
    assert all(
        node.kwargs.get("attn_mask") is None and (len(node.args) < 4 or node.args[3] is None)
        for node in attention
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
