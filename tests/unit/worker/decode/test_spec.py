"""The worker's preprocessing against Hugging Face's own, for the hub's common image classifiers.

Each case is a tiny random model built here with its architecture's real processor class (or the
hub's legacy ``feature_extractor_type`` config format): the worker's labels and scores on CPU must
equal ``transformers.pipeline("image-classification")``'s on the same files.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.support.helpers import jpeg_bytes
from worker.config import ConfigError, WorkerConfig
from worker.decode.spec import Preprocess, load_preprocess

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
HALF = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
STAGES = dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])

# case -> (config class, model class, config kwargs, processor class, processor kwargs, legacy config)
# A legacy config replaces the saved preprocessor_config.json: the hub's older format.
CASES = {
    "vit": ("ViTConfig", "ViTForImageClassification", VIT, "ViTImageProcessor", dict(size={"height": 32, "width": 32}, **HALF), None),
    "vit-legacy": (
        "ViTConfig", "ViTForImageClassification", VIT, None, None,
        {"feature_extractor_type": "ViTFeatureExtractor", "size": 32, "resample": 2, "do_resize": True, "do_normalize": True, **HALF},
    ),
    "deit": (
        "DeiTConfig", "DeiTForImageClassification", VIT, "DeiTImageProcessor",
        dict(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}, **IMAGENET), None,
    ),
    "deit-legacy": (
        "DeiTConfig", "DeiTForImageClassification", VIT, None, None,
        {"feature_extractor_type": "DeiTFeatureExtractor", "size": 36, "crop_size": 32, "do_center_crop": True, "resample": 3, **IMAGENET},
    ),
    "beit": (
        "BeitConfig", "BeitForImageClassification", dict(VIT, use_mean_pooling=True), "BeitImageProcessor",
        dict(size={"height": 32, "width": 32}, resample=2, **HALF), None,
    ),
    "swin-legacy": (
        "SwinConfig", "SwinForImageClassification",
        dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2), None, None,
        {"feature_extractor_type": "ViTFeatureExtractor", "size": 32, "resample": 3, "do_resize": True, "do_normalize": True, **IMAGENET},
    ),
    "convnext": (
        "ConvNextConfig", "ConvNextForImageClassification", STAGES, "ConvNextImageProcessor",
        dict(size={"shortest_edge": 32}, crop_pct=0.875, resample=3, **IMAGENET), None,
    ),
    "convnext-legacy": (
        "ConvNextConfig", "ConvNextForImageClassification", STAGES, None, None,
        {"feature_extractor_type": "ConvNextFeatureExtractor", "size": 32, "crop_pct": 0.875, "resample": 3, "do_resize": True, "do_normalize": True, **IMAGENET},
    ),
    "convnext-384": (  # at 384 and above ConvNeXt warps to a square, no crop
        "ConvNextConfig", "ConvNextForImageClassification", STAGES, "ConvNextImageProcessor",
        dict(size={"shortest_edge": 384}, resample=2, **IMAGENET), None,
    ),
    "convnextv2": (
        "ConvNextV2Config", "ConvNextV2ForImageClassification", STAGES, "ConvNextImageProcessor",
        dict(size={"shortest_edge": 32}, crop_pct=0.9, resample=3, **IMAGENET), None,
    ),
    "resnet-legacy": (
        "ResNetConfig", "ResNetForImageClassification", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), None, None,
        {"feature_extractor_type": "ConvNextFeatureExtractor", "size": 32, "crop_pct": 0.875, "resample": 3, "do_resize": True, "do_normalize": True, **IMAGENET},
    ),
    "efficientnet": (  # google/efficientnet-b0's settings: nearest resample, no include_top
        "EfficientNetConfig", "EfficientNetForImageClassification",
        dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128), "EfficientNetImageProcessor",
        dict(size={"height": 32, "width": 32}, resample=0, include_top=False, image_mean=[0.485, 0.456, 0.406], image_std=[0.47853944, 0.4732864, 0.47434163]),
        None,
    ),
    "efficientnet-offset-top": (
        "EfficientNetConfig", "EfficientNetForImageClassification",
        dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128), "EfficientNetImageProcessor",
        dict(size={"height": 32, "width": 32}, rescale_offset=True, include_top=True), None,
    ),
    "mobilevit": (
        "MobileViTConfig", "MobileViTForImageClassification",
        dict(image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2, mlp_ratio=1.0, expand_ratio=1.0),
        "MobileViTImageProcessor", dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}), None,
    ),
    "mobilevit-legacy-padded": (  # a crop larger than the resized image: HF pads with zeros
        "MobileViTConfig", "MobileViTForImageClassification",
        dict(image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2, mlp_ratio=1.0, expand_ratio=1.0),
        None, None,
        {"feature_extractor_type": "MobileViTFeatureExtractor", "size": 28, "crop_size": 32, "do_center_crop": True, "do_flip_channel_order": True, "resample": 2, "do_resize": True},
    ),
    "dinov2": (
        "Dinov2Config", "Dinov2ForImageClassification", dict(VIT, mlp_ratio=1), "BitImageProcessor",
        dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, **IMAGENET), None,
    ),
    "siglip": (
        "SiglipConfig", "SiglipForImageClassification", dict(vision_config=dict(VIT, intermediate_size=37)), "SiglipImageProcessor",
        dict(size={"height": 32, "width": 32}), None,
    ),
    "clip-legacy": (
        "CLIPConfig", "CLIPForImageClassification", dict(vision_config=dict(VIT, intermediate_size=37)), None, None,
        {"feature_extractor_type": "CLIPFeatureExtractor", "size": 32, "crop_size": 32, "do_center_crop": True, "resample": 3, "do_resize": True, "do_normalize": True,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    ),
}  # fmt: skip
# The legacy formats' processor classes, to save a model's other files with.
LEGACY_CLASS = {"vit": "ViT", "deit": "DeiT", "swin": "ViT", "convnext": "ConvNext", "resnet": "ConvNext"}


def build_model(case: str, root: Path) -> Path:
    import transformers

    config_cls, model_cls, config_kwargs, processor_cls, processor_kwargs, legacy = CASES[case]
    out = root / case
    torch.manual_seed(sum(map(ord, case)))
    config = getattr(transformers, config_cls)(num_labels=5, **config_kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    # He-scaled weights and unit norm scales: with the models' own small init, activations of so
    # few channels fade to nothing through the layers, and every image would get the same scores.
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() >= 2):
            weight.normal_(0, (2.0 / weight[0].numel()) ** 0.5)
        for norm in model.modules():
            if isinstance(norm, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                norm.weight.fill_(1.0)
        # Then the head scaled to logits of a trained classifier's spread, so that scores and labels
        # follow the pixels (EfficientNet's features stay faint even so).
        logits = model(pixel_values=torch.randn(8, 3, 32, 32)).logits
        head = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(2.0 / logits.std())
        head.bias.zero_()
    model.save_pretrained(out)
    if legacy is None:
        pil = getattr(transformers, processor_cls + "Pil", None) or getattr(transformers, processor_cls)
        pil(**processor_kwargs).save_pretrained(out)
    else:
        (out / "preprocessor_config.json").write_text(json.dumps(legacy))
    return out


def exif_rotated_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    img = Image.open(io.BytesIO(jpeg_bytes(77, size=size)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    rgba = io.BytesIO()
    Image.frombytes("RGBA", (37, 29), bytes(range(256)) * 17).save(rgba, format="PNG")
    files = {
        "landscape.jpg": jpeg_bytes(1, size=(40, 30)),
        "portrait.jpg": jpeg_bytes(2, size=(30, 44)),
        "gray.jpg": jpeg_bytes(3, size=(33, 33), mode="L"),
        "alpha.png": rgba.getvalue(),
        "rotated.jpg": exif_rotated_jpeg((40, 24), 6),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return sorted(root.iterdir())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(case)``: the case's model directory, built on first use."""
    root, done = tmp_path_factory.mktemp("models"), {}

    def get(case: str) -> Path:
        if case not in done:
            done[case] = build_model(case, root)
        return done[case]

    return get


def worker_results(images: list[Path], model: Path, out: Path) -> dict[str, tuple[str, float]]:
    from worker.run import run

    run(
        WorkerConfig(
            input=str(images[0].parent),
            output=str(out),
            model=str(model),
            device="cpu",
            batch_size=2,
            log_interval=60,
        )
    )
    rows = [r for part in sorted((out / "parts").glob("*.csv")) for r in csv.DictReader(part.open())]
    return {r["uri"]: (r["classification"], float(r["score"])) for r in rows}


@pytest.mark.parametrize("case", list(CASES))
def test_worker_equals_the_hugging_face_pipeline(case, images, built, tmp_path):
    from transformers import pipeline

    model = built(case)
    got = worker_results(images, model, tmp_path / "out")
    classify = pipeline("image-classification", model=str(model), device="cpu")
    assert len(got) == len(images)
    for path in images:
        want = classify(str(path), top_k=1)[0]
        label, score = got[str(path)]
        assert label == want["label"], f"{case}: {path.name}"
        assert score == pytest.approx(want["score"], abs=1e-4), f"{case}: {path.name}"


@pytest.mark.parametrize("case", list(CASES))
def test_decoded_pixels_are_the_processors(case, images, built):
    """The decoder's pixels are the processor's own, on the image ``pipeline`` loads from the file."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    from worker.decode.cpu import CpuDecoder

    model = built(case)
    processor = AutoImageProcessor.from_pretrained(str(model))
    with ThreadPoolExecutor(2) as pool:
        decoded = CpuDecoder(load_preprocess(str(model)), pool)([p.read_bytes() for p in images])
    assert decoded.ok == list(range(len(images))) and not decoded.errors
    for k, path in enumerate(images):
        want = processor(images=load_image(str(path)), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(decoded.pixels[k], want, rtol=0, atol=1e-6, msg=f"{case}: {path.name}")


def test_legacy_and_current_formats_give_the_same_steps(built):
    for legacy, current in (("convnext-legacy", "convnext"), ("vit-legacy", "vit"), ("deit-legacy", "deit")):
        old, new = (load_preprocess(str(built(c))) for c in (legacy, current))
        assert (old.resize, old.crops, old.resample, old.mean) == (
            new.resize,
            new.crops,
            new.resample,
            new.mean,
        )
    convnext = load_preprocess(str(built("convnext")))
    assert convnext.resize == ("shortest_edge", int(32 / 0.875)) and convnext.crops == ((32, 32),)


def test_what_the_gpu_path_cannot_reproduce_is_named(built):
    def reason(case: str) -> str | None:
        return load_preprocess(str(built(case))).gpu_inexact()

    assert reason("vit") is None and reason("convnext") is None and reason("mobilevit") is None
    assert "NEAREST" in reason("efficientnet")
    assert "pads" in reason("mobilevit-legacy-padded")


def test_a_processor_that_changes_its_steps_is_refused():
    from transformers import LevitImageProcessorPil

    with pytest.raises(ConfigError, match="LevitImageProcessor changes the step"):
        Preprocess.from_processor(LevitImageProcessorPil())


def test_a_processor_of_varying_output_size_is_refused():
    from transformers import BitImageProcessorPil

    with pytest.raises(ConfigError, match="varying sizes"):
        Preprocess.from_processor(BitImageProcessorPil(do_center_crop=False))


@pytest.mark.parametrize(
    "case", ["vit", "efficientnet", "efficientnet-offset-top", "mobilevit", "clip-legacy"]
)
def test_the_gpu_paths_multiply_add_is_the_processors_arithmetic(case, built):
    """The GPU decoders fold rescale and normalizations into ``uint8 * mul + add`` per channel."""
    import numpy as np

    from worker.decode.cpu import normalize_numpy

    pre = load_preprocess(str(built(case)))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    mul, add = pre.affine()
    folded = pixels.astype(np.float32) * np.float32(mul) + np.float32(add)
    if pre.flip_channels:
        folded = folded[..., ::-1]
    np.testing.assert_allclose(folded.transpose(0, 3, 1, 2), normalize_numpy(pixels, pre), atol=1e-5)
