"""AttnLRP and CP-LRP equal LXT (lxt 2.1, its "efficient" rules): rule by rule in this process
(LXT's rule functions patch nothing), and on a whole Hugging Face ViT in a subprocess (its patch
map changes library classes process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai


def _lxt():
    try:
        from _compat import import_torchvision

        import_torchvision()
        import lxt.efficient.patches as patches
        import lxt.efficient.rules as rules
    except ImportError as error:  # pragma: no cover - lxt is a test dependency
        pytest.skip(f"lxt is not usable here: {error}")
    return rules, patches


class _Block(nn.Module):
    """One of each call the rules treat specially, on (N, tokens, dim) tokens.

    ``lxt=True`` runs the forward with LXT's rule functions (so that ``x * grad`` is LXT's
    relevance); ``lxt=False`` is the plain model srdxai explains.
    """

    def __init__(self, part: str, lxt: tuple | None = None):
        super().__init__()
        torch.manual_seed(2)
        self.part, self.lxt = part, lxt
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.3, 0.3)
        self.a, self.b, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        rules = self.lxt[0] if self.lxt else None
        if self.part == "layer_norm":
            if self.lxt:
                h = types.MethodType(self.lxt[1].layer_norm_forward, self.norm)(t)
            else:
                h = self.norm(t)
        elif self.part == "gelu":
            z = self.a(t)
            h = rules.identity_rule_implicit(F.gelu, z) if rules else F.gelu(z)
        elif self.part == "mul":
            p = self.a(t) * self.b(t)
            h = rules.divide_gradient(p, 2) if rules else p
        elif self.part in ("attention", "cp_attention"):
            q, k, v = self.a(t), self.b(t), self.v(t)
            if rules and self.part == "cp_attention":
                q, k = rules.stop_gradient(q), rules.stop_gradient(k)
            elif rules:  # LXT's wrap_attention_forward: q, k get 1/4 and v 1/2 of the gradient
                q, k, v = (rules.divide_gradient(q, 4), rules.divide_gradient(k, 4),
                           rules.divide_gradient(v, 2))
            s = torch.softmax((q * 0.5) @ k.transpose(-2, -1), dim=-1)
            h = s @ v
        return self.head(h.mean(1))


@pytest.mark.parametrize("part", ["layer_norm", "gelu", "mul", "attention", "cp_attention"])
def test_each_rule_equals_lxt(part):
    rules, patches = _lxt()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2])
    theirs_model = _Block(part, (rules, patches)).double().eval()
    leaf = x.clone().requires_grad_(True)
    theirs_model(leaf)[torch.arange(2), target].sum().backward()
    theirs = (leaf * leaf.grad).sum(1)
    method = "cp_lrp" if part == "cp_attention" else "attnlrp"
    ours = srdxai.explain(_Block(part).double(), x, target, method)
    assert theirs.abs().max() > 0
    # rtol 1e-6: LXT stabilises the identity rule with x + 1e-10, srdxai with x + 1e-10 sign(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9 * float(theirs.abs().max()))


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_hugging_face_vit_equals_lxt(method, tmp_path):
    _lxt()
    try:
        from transformers import ViTConfig, ViTForImageClassification
    except ImportError as error:  # pragma: no cover
        pytest.skip(f"transformers is not usable here: {error}")
    script = Path(__file__).with_name("lxt_vit_reference.py")
    out = tmp_path / "lxt.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, str(script), str(out)] + (["--cp"] if method == "cp_lrp" else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = torch.load(out, weights_only=True)
    hf = ViTForImageClassification(ViTConfig(**ref["config"])).double().eval()
    hf.load_state_dict(ref["state"])

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).logits

    ours = srdxai.explain(Logits(hf), ref["x"], ref["target"], method, channel_reduce="none")
    theirs = ref["relevance"]
    # the logit is conserved by neither rule set exactly (biases absorb), but the maps agree
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8 * float(theirs.abs().max()))


def test_attnlrp_differs_from_cp_lrp_and_from_gradient_x_input():
    from srdxai.models.zoo import small_vit

    torch.manual_seed(0)
    m = small_vit(num_classes=4, image_size=16).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    a = srdxai.explain(m, x, 1, "attnlrp")
    c = srdxai.explain(m, x, 1, "cp_lrp")
    g = srdxai.explain(m, x, 1, "gradient_x_input")
    assert not torch.allclose(a, c) and not torch.allclose(a, g)
