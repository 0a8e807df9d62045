"""Stage 4's pacing on a CPU: which blocks the pacer hooks."""

from __future__ import annotations

from worker.infer import BlockPacer


def test_block_pacer_hooks_every_encoder_block(tiny_model):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(tiny_model))
    pacer = BlockPacer(model, depth=2)
    assert len(pacer.handles) == model.config.num_hidden_layers
    assert BlockPacer(model, depth=0).handles == []
