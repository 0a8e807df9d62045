"""The image-classification task: its fp32 head on bf16 features."""

from __future__ import annotations

import torch

from worker.tasks.classification import keep_classifier_in_fp32


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
