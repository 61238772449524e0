"""LXT's own AttnLRP / CP-LRP relevance for a tiny random Hugging Face ViT, written to a file.

    python tests/lxt_vit_reference.py OUT.pt

Run in a subprocess by ``test_attnlrp.py``: LXT 2.1 has no patch map for transformers' ViT, so
this builds one from LXT's patch functions, and those patch classes process-wide
(``torch.nn.LayerNorm``, ``torch.nn.Dropout``, transformers' attention registry) with no undo.
Saves the config, the weights, the input, the target and both relevance maps (x * grad).
"""

from __future__ import annotations

import os
import sys
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _compat import import_torchvision  # noqa: E402

import_torchvision()

import torch  # noqa: E402
from lxt.efficient import monkey_patch  # noqa: E402
from lxt.efficient.patches import (  # noqa: E402
    dropout_forward,
    layer_norm_forward,
    non_linear_forward,
    patch_attention,
    patch_cp_attention,
    patch_method,
)
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.activations import GELUActivation  # noqa: E402
from transformers.models.vit import modeling_vit  # noqa: E402

CONFIG = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64, num_labels=10,
              attn_implementation="sdpa")


def build() -> ViTForImageClassification:
    """The model, with weights larger than HF's init (std 0.02 makes every softmax uniform,
    and the rules would be hard to tell apart)."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**CONFIG)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embeddings" not in name.split(".")[-1]:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
            elif "layernorm" in name and name.endswith("weight"):
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.3)
    return model


def relevance(model, x, target, cp: bool) -> torch.Tensor:
    patch_map = {
        modeling_vit.nn.LayerNorm: partial(patch_method, layer_norm_forward),
        GELUActivation: partial(patch_method, non_linear_forward, keep_original=True),
        modeling_vit.nn.Dropout: partial(patch_method, dropout_forward),
        modeling_vit: patch_cp_attention if cp else patch_attention,
    }
    monkey_patch(modeling_vit, patch_map=patch_map)
    leaf = x.clone().requires_grad_(True)
    out = model(leaf).logits
    out[torch.arange(len(target)), target].sum().backward()
    return (leaf * leaf.grad).detach()


def main(path: str) -> None:
    model = build()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 0, 7])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # one process per rule set: AttnLRP and CP patch the same functions
    cp = "--cp" in sys.argv
    rel = relevance(model, x, target, cp)
    torch.save({"config": CONFIG, "state": state, "x": x, "target": target, "relevance": rel},
               path)


if __name__ == "__main__":
    main(sys.argv[1])
