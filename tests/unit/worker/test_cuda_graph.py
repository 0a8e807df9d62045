"""The CUDA-graph path's parts that run on a CPU: the capture-time mask override, the decision check.

The capture itself needs a GPU: ``python -m benchmarks.gpu_throughput`` measures it there.
"""

from __future__ import annotations

import torch

from worker.cuda_graph import same_decisions, unpadded_attention_without_mask


def test_capture_mask_override_drops_only_the_all_visible_mask(tiny_model):
    from transformers import AutoModelForImageClassification, masking_utils

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


def test_same_decisions_accepts_near_ties_and_rejects_a_wrong_forward():
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


def test_compiled_forward_traces_attention_without_a_mask(tiny_model):
    """The compiled candidate of ``fastest_graph``: traced under the override, SDPA gets no mask
    (so the fused kernels stay eligible) and the logits are the eager forward's."""
    from transformers import AutoModelForImageClassification

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
