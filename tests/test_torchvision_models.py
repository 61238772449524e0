"""torchvision's own model code, beside the timm code of the coverage suite.

torchvision's Vision Transformer runs its attention through ``nn.MultiheadAttention``
(``F.multi_head_attention_forward``, sequence first), which the operation view decomposes into
the calls timm's attention is made of. With the same weights, every method must therefore give
torchvision's ViT the same map as timm's: a check that needs no oracle of its own, since timm's
ViT is checked against the oracles elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srdxai
from coverage_archs import FAST_OPTIONS
from srdxai.errors import UnsupportedOperationError
from srdxai.methods import METHODS

try:
    from _compat import import_torchvision

    import_torchvision()
    import timm
    from torchvision.models import VisionTransformer
except ImportError:  # pragma: no cover
    pytest.skip("timm or torchvision does not import", allow_module_level=True)

DEPTH, HEADS, DIM, MLP, PATCH, SIZE, CLASSES = 2, 2, 32, 64, 8, 32, 5


def vit_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A small torchvision ViT (random weights, a random head: torchvision starts it at 0)
    and the timm ViT with the same weights, both float64 and in eval mode."""
    torch.manual_seed(seed)
    tv = VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=DEPTH,
                           num_heads=HEADS, hidden_dim=DIM, mlp_dim=MLP, num_classes=CLASSES)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in tv.modules():  # non-trivial norms, head and position embedding
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
        tv.heads.head.weight.copy_(0.2 * torch.randn(tv.heads.head.weight.shape, generator=g))
        tv.heads.head.bias.copy_(0.1 * torch.randn(CLASSES, generator=g))
        tv.encoder.pos_embedding.copy_(0.1 * torch.randn(tv.encoder.pos_embedding.shape,
                                                         generator=g))
        tv.class_token.copy_(0.1 * torch.randn(tv.class_token.shape, generator=g))
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=MLP / DIM, num_classes=CLASSES, qkv_bias=True)
    names = {"conv_proj": "patch_embed.proj", "class_token": "cls_token",
             "encoder.pos_embedding": "pos_embed", "encoder.ln": "norm", "heads.head": "head"}
    for i in range(DEPTH):
        tv_block, tm_block = f"encoder.layers.encoder_layer_{i}", f"blocks.{i}"
        names.update({f"{tv_block}.ln_1": f"{tm_block}.norm1",
                      f"{tv_block}.self_attention.in_proj_": f"{tm_block}.attn.qkv.",
                      f"{tv_block}.self_attention.out_proj": f"{tm_block}.attn.proj",
                      f"{tv_block}.ln_2": f"{tm_block}.norm2",
                      f"{tv_block}.mlp.0": f"{tm_block}.mlp.fc1",
                      f"{tv_block}.mlp.3": f"{tm_block}.mlp.fc2"})
    state = {}
    for key, value in tv.state_dict().items():
        prefix = max((p for p in names if key.startswith(p)), key=len)
        state[names[prefix] + key[len(prefix):]] = value
    tm.load_state_dict(state)
    return tv.double().eval(), tm.double().eval()


@pytest.fixture(scope="module")
def models():
    return vit_pair()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)


def test_the_two_vits_compute_the_same_logits(models, x):
    tv, tm = models
    with torch.no_grad():
        torch.testing.assert_close(tv(x), tm(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_torchvision_vit_gets_the_map_of_the_same_timm_vit(models, x, method):
    tv, tm = models
    maps = []
    for model in (tv, tm):
        torch.manual_seed(3)  # the same noise draws for SmoothGrad
        maps.append(srdxai.explain(model, x, [1, 4], method, **FAST_OPTIONS.get(method, {})))
    assert maps[0].shape == (2, SIZE, SIZE)
    assert torch.isfinite(maps[0]).all()
    scale = maps[1].abs().max().clamp_min(1e-300)
    assert ((maps[0] - maps[1]).abs().max() / scale).item() < 1e-8, method


def test_srd_on_torchvision_vit_sums_to_the_logit(models, x):
    tv, _ = models
    m = srdxai.explain(tv, x, [1, 4], "srd")
    logits = tv(x).detach()[torch.arange(2), torch.tensor([1, 4])]
    torch.testing.assert_close(m.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)


class MaskedAttention(nn.Module):
    """nn.MultiheadAttention with a key padding mask: refused, not silently unmasked."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        tokens = self.embed(x.flatten(2).transpose(1, 2))
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool)
        mask[:, -1] = True
        out, _ = self.attn(tokens, tokens, tokens, key_padding_mask=mask, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize("method", ["abslrp", "attnlrp", "srd_tokens"])
def test_masked_multi_head_attention_is_refused_by_name(method):
    model = MaskedAttention().eval()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedOperationError, match="key padding mask"):
        srdxai.explain(model, x, 0, method)


class CrossAttention(nn.Module):
    """Query from one projection, key and value from another: the same map as the attention
    written out with the same weights (key and value from one packed projection, as torch
    computes them when key is value)."""

    def __init__(self, written_out: bool = False):
        super().__init__()
        self.written_out = written_out
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (N, L, 3)
        # sequence first, as nn.MultiheadAttention takes it without batch_first
        q, kv = self.a(tokens).transpose(0, 1), self.b(tokens).transpose(0, 1)
        if not self.written_out:
            out, _ = self.attn(q, kv, kv)
        else:  # batch first, as timm writes it (rules take dimension 0 for the batch)
            w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
            qb, kvb = q.transpose(0, 1), kv.transpose(0, 1)
            n, length, e = qb.shape
            heads, d = 2, e // 2
            qq = nn.functional.linear(qb, w[:e], bias[:e])
            # one dense layer for key and value, as torch computes them when key is value
            # (absLRP normalises each call's input relevance: two layers would differ)
            kk, vv = nn.functional.linear(kvb, w[e:], bias[e:]).chunk(2, -1)

            def split(t):
                return t.reshape(n, length, heads, d).transpose(1, 2)

            a = torch.softmax((split(qq) * d ** -0.5) @ split(kk).transpose(-2, -1), -1)
            o = (a @ split(vv)).transpose(1, 2).reshape(n, length, e)
            out = self.attn.out_proj(o).transpose(0, 1)
        return self.head(out.transpose(0, 1).mean(1))


@pytest.mark.parametrize("method", ["abslrp", "attnlrp", "lrp_epsilon_plus", "srd_tokens",
                                    "gradient_x_input"])
def test_cross_attention_is_the_attention_written_out(method):
    torch.manual_seed(0)
    packed = CrossAttention().double().eval()
    written = CrossAttention(written_out=True).double().eval()
    written.load_state_dict(packed.state_dict())
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(packed(x), written(x), rtol=1e-12, atol=1e-12)
    a = srdxai.explain(packed, x, 1, method)
    b = srdxai.explain(written, x, 1, method)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
