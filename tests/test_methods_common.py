"""Properties every registered method must have: shape, batch-versus-single, model restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srdxai
from srdxai.methods import METHODS
from srdxai.models.zoo import small_vit

# Options that keep the sampled methods fast here; their full defaults are tested elsewhere.
FAST_OPTIONS = {
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"samples": 4},
    "scorecam": {"internal_batch_size": 4},
}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.pool(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.gap(self.relu2(self.conv2(h))).flatten(1))


# Methods that explain Vision Transformers only (they read attention maps): the shared checks
# run them on a small ViT instead of the CNN.
VIT_ONLY = {"attention_rollout", "transformer_attribution", "srd_tokens"}


def model(name: str = "") -> nn.Module:
    torch.manual_seed(0)
    if name in VIT_ONLY:
        return small_vit(num_classes=4, image_size=16).double().train()
    m = Small().double()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.3, 0.3)
        m.bn1.running_var.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(-0.3, 0.3)
    return m.train()  # methods must evaluate in eval mode and give the train flag back


def state(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            [x.training for x in m.modules()], [p.requires_grad for p in m.parameters()],
            [(len(x._forward_hooks), len(x._forward_pre_hooks), len(x._backward_hooks))
             for x in m.modules()])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shape_batch_versus_single_and_model_restored(name):
    m = model(name)
    before = state(m)
    g = torch.Generator().manual_seed(3)
    shape = (3, 3, 16, 16) if name in VIT_ONLY else (3, 3, 10, 12)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    targets = [1, 0, 3]
    opts = FAST_OPTIONS.get(name, {})
    batch = srdxai.explain(m, x, targets, name, **opts)
    assert batch.shape == (3, *shape[2:]) and batch.dtype == torch.float64
    assert torch.isfinite(batch).all()
    single = torch.cat([srdxai.explain(m, x[i:i + 1], targets[i], name, **opts)
                        for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-7, atol=1e-10)
    chunked = srdxai.explain(m, x, targets, name, batch_size=2, **opts)
    torch.testing.assert_close(batch, chunked, rtol=1e-7, atol=1e-10)
    after = state(m)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_target_is_a_clear_error_and_leaves_the_model_alone(name):
    m = model(name)
    before = state(m)
    size = 16 if name in VIT_ONLY else 8
    with pytest.raises(srdxai.SrdxaiError, match="out of range"):
        srdxai.explain(m, torch.randn(2, 3, size, size, dtype=torch.float64), 9, name,
                       **FAST_OPTIONS.get(name, {}))
    assert before[1:] == state(m)[1:]


# Everything that explains a Vision Transformer (the rest needs conv feature maps or SRD's
# PFV engine and refuses a ViT with a clear error, tested in test_zoo.py).
ON_VIT = sorted(VIT_ONLY | {"abslrp", "attnlrp", "cp_lrp", "gradient", "saliency",
                            "gradient_x_input", "integrated_gradients", "smoothgrad",
                            "occlusion"})


@pytest.mark.parametrize("name", ON_VIT)
def test_vit_batch_versus_single_and_model_restored(name):
    m = model("attention_rollout")  # the small ViT, in train mode
    before = state(m)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    opts = FAST_OPTIONS.get(name, {})
    batch = srdxai.explain(m, x, [1, 0, 3], name, **opts)
    assert batch.shape == (3, 16, 16) and torch.isfinite(batch).all()
    single = torch.cat([srdxai.explain(m, x[i:i + 1], t, name, **opts)
                        for i, t in enumerate([1, 0, 3])])
    torch.testing.assert_close(batch, single, rtol=1e-7, atol=1e-10)
    after = state(m)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]
