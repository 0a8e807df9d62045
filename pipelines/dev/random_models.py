"""Random-weight image-text models and vision backbones built locally, for machines with no internet.

Each is saved as ``save_pretrained()`` writes it, with the real processor classes of its family
(CLIP's image processor and BPE tokenizer, SigLIP's image processor, ViT's and DINOv2's (BiT)
image processors), so transformers' own pipelines load them as they load hub checkpoints:
the tests compare the worker's tasks against those pipelines on them. SigLIP's own tokenizer
needs sentencepiece; a character-level fast tokenizer (``tokenizers``) stands in for it.

``tiny`` models (32 px, 2 layers) run in milliseconds on a CPU; without it ``make_clip`` builds
the size of CLIP ViT-B/16 (224 px, 16 px patches, 12 x 768 vision, 12 x 512 text, 512-d
projections), for the GPU benchmark. The weights are random: outputs mean nothing.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from pipelines.dev.random_model import _quiet_transformers

# The tokenizers' vocabulary: characters, so that every label (letters, digits, punctuation) tokenizes.
_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def _clip_tokenizer(out: Path):
    """A real CLIPTokenizer over characters (BPE without merges): ids 0 and 1 are its BOS and EOS."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt")), len(vocab)


def _char_tokenizer():
    """A character-level fast tokenizer with SigLIP's special tokens (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split("", behavior="isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=64
    )
    return tokenizer, len(vocab)


def make_clip(out: str | Path, *, tiny: bool = True, seed: int = 0) -> Path:
    """A random-weight CLIPModel with CLIPImageProcessor and CLIPTokenizer under ``out``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out)
    with _quiet_transformers():
        with tempfile.TemporaryDirectory() as files:
            tokenizer, vocab_size = _clip_tokenizer(Path(files))
        if tiny:
            text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
            vision = dict(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
            )
            projection, size = 16, 32
        else:  # CLIP ViT-B/16
            text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
            vision = dict(
                image_size=224,
                patch_size=16,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
            )
            projection, size = 512, 224
        text.update(
            vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1
        )
        torch.manual_seed(seed)
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
        CLIPModel(config).eval().save_pretrained(out)
        processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def make_siglip(out: str | Path, *, seed: int = 0) -> Path:
    """A tiny random-weight SiglipModel with SiglipImageProcessor and a character tokenizer under ``out``."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    out = Path(out)
    with _quiet_transformers():
        tokenizer, vocab_size = _char_tokenizer()
        arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        torch.manual_seed(seed)
        config = SiglipConfig(
            text_config=dict(
                vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, **arch
            ),
            vision_config=dict(image_size=32, patch_size=8, **arch),
        )
        SiglipModel(config).eval().save_pretrained(out)
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def make_backbone(out: str | Path, family: str, *, seed: int = 0) -> Path:
    """A tiny random-weight ViTModel (with its pooler) or Dinov2Model and its image processor under ``out``."""
    import torch
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    out = Path(out)
    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    with _quiet_transformers():
        torch.manual_seed(seed)
        if family == "vit":
            ViTModel(ViTConfig(image_size=32, patch_size=8, **arch)).eval().save_pretrained(out)
            ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
        elif family == "dinov2":
            Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **arch)).eval().save_pretrained(out)
            BitImageProcessor(
                size={"shortest_edge": 36},
                crop_size={"height": 32, "width": 32},
                image_mean=[0.485, 0.456, 0.406],
                image_std=[0.229, 0.224, 0.225],
                do_convert_rgb=True,
            ).save_pretrained(out)
        else:
            raise ValueError(f"unknown backbone family {family!r}")
    return out
