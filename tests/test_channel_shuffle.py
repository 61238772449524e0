"""Channel permutations (ShuffleNet's channel shuffle) in the PFV engine: one path that moves
the whole vector (docs/srd.md, "Channel permutations"), so SRD of a model that shuffles its
channels before a convolution equals SRD of the same model with the shuffle folded into that
convolution's weights; other uses of a split channel axis are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srdxai
from srdxai.errors import UnsupportedOperationError

pytestmark = pytest.mark.usefixtures("float64_default")


def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ``channel_shuffle``, as ShuffleNetV2 writes it."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


def shuffle_order(channels: int, groups: int) -> torch.Tensor:
    """Output channel ``j`` of :func:`shuffle` is input channel ``order[j]``."""
    return torch.arange(channels).reshape(groups, channels // groups).t().reshape(-1)


class ShuffleNet(nn.Module):
    """conv -> BN -> ReLU -> [shuffle] -> conv -> BN -> ReLU -> GAP -> linear."""

    def __init__(self, shuffled: bool = True, groups: int = 2, channels: int = 6):
        super().__init__()
        self.shuffled, self.groups = shuffled, groups
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        if self.shuffled:
            h = shuffle(h, self.groups)
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()


def pair(groups: int = 2, channels: int = 6, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The shuffling model and the same model with the shuffle folded into ``conv2``."""
    torch.manual_seed(seed)
    shuffled = _randomised(ShuffleNet(True, groups, channels), seed)
    folded = ShuffleNet(False, groups, channels)
    folded.load_state_dict(shuffled.state_dict())
    order = shuffle_order(channels, groups)
    inverse = torch.argsort(order)
    with torch.no_grad():  # conv2(P h) = (conv2 with input channel i at column inverse[i]) h
        folded.conv2.weight.copy_(shuffled.conv2.weight[:, inverse])
    return shuffled, folded.eval()


@pytest.mark.parametrize("groups, channels", [(2, 6), (3, 6), (2, 8)])
def test_srd_of_a_shuffle_equals_srd_with_the_shuffle_folded_into_the_next_convolution(
        groups, channels):
    shuffled, folded = pair(groups, channels, seed=groups + channels)
    x = torch.randn(3, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = shuffled(x)
        assert torch.allclose(logits, folded(x), atol=1e-12)
    target = torch.tensor([0, 2, 3])
    a = srdxai.explain(shuffled, x, target, "srd")
    b = srdxai.explain(folded, x, target, "srd")
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # conservation: the map sums to the target logit
    expected = logits.gather(1, target[:, None])[:, 0]
    assert torch.allclose(a.flatten(1).sum(1), expected, rtol=1e-9, atol=1e-12)
    # and the layer map below the shuffle too
    low_a = srdxai.explain(shuffled, x, target, "srd", layer="relu@0")
    low_b = srdxai.explain(folded, x, target, "srd", layer="relu@0")
    assert torch.allclose(low_a, low_b, rtol=1e-10, atol=1e-12)


def test_a_channel_slice_concatenation_is_not_a_permutation():
    """Writing the same shuffle as a concatenation of single-channel slices makes one path
    per channel, so the bias after it is split differently (docs/srd.md): the map differs
    from the permutation's, while both conserve the logit. This keeps the test above from
    passing for an engine that decomposed the shuffle into per-channel paths."""
    shuffled, _ = pair(2, 6, seed=3)

    class Sliced(ShuffleNet):
        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = torch.cat([h[:, i:i + 1] for i in shuffle_order(6, 2).tolist()], 1)
            h = torch.relu(self.bn2(self.conv2(h)))
            return self.fc(h.mean((2, 3)))

    sliced = Sliced(True, 2, 6)
    sliced.load_state_dict(shuffled.state_dict())
    sliced.eval()
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    a = srdxai.explain(shuffled, x, 1, "srd")
    b = srdxai.explain(sliced, x, 1, "srd")
    assert torch.allclose(a.flatten(1).sum(1), b.flatten(1).sum(1), rtol=1e-9)
    assert not torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_a_view_and_back_without_a_transpose_is_the_identity():
    class Roundtrip(ShuffleNet):
        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).reshape(n, c, hh, ww)
            h = torch.relu(self.bn2(self.conv2(h)))
            return self.fc(h.mean((2, 3)))

    _, folded = pair(2, 6, seed=5)
    identity = _randomised(Roundtrip(False, 2, 6), 0)
    identity.load_state_dict(folded.state_dict())
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(srdxai.explain(identity, x, 2, "srd"),
                          srdxai.explain(folded, x, 2, "srd"), rtol=1e-10, atol=1e-12)


class GroupSum(ShuffleNet):
    """Sums the channel groups of a split axis (split attention's sum over its branches):
    not a permutation, but the sum of the source's channel blocks. ``shuffled=False`` here:
    the same written with ``narrow`` and ``+``."""

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        n, c, hh, ww = h.shape
        if self.shuffled:
            h = h.view(n, 2, c // 2, hh, ww).sum(1)
        else:
            h = h.narrow(1, 0, c // 2) + h.narrow(1, c // 2, c // 2)
        h = torch.cat([h, h], 1)
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def test_a_sum_over_the_groups_of_a_split_axis_is_a_sum_of_channel_blocks():
    """Refused until December 2026 (when SKNet's and ResNeSt's split attention came in):
    the map of the model adding the two channel blocks, and the logit."""
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    summed = _randomised(GroupSum(True, 2, 6), 0)
    written = GroupSum(False, 2, 6).eval()
    written.load_state_dict(summed.state_dict())
    got = srdxai.explain(summed, x, 0, "srd")
    torch.testing.assert_close(got, srdxai.explain(written, x, 0, "srd"), rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(got.sum(), summed(x)[0, 0], rtol=1e-5, atol=1e-6)


class SpatialSwap(ShuffleNet):
    """Moves a spatial axis among the split channel axes."""

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(2, 3).reshape(n, c, hh, ww)
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("cls, words", [(SpatialSwap, "split")])
def test_other_uses_of_split_channels_are_refused_by_name(cls, words):
    # seeded: the automatic seed is Grad-CAM's behind value-moving operations the engine
    # cannot decompose (a VGG's flatten); where that CAM is zero everywhere nothing reaches
    # the operation and the map is zero, with no refusal to check
    torch.manual_seed(0)
    model = _randomised(cls(False, 2, 6), 0)
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    with pytest.raises(UnsupportedOperationError, match=words):
        srdxai.explain(model, x, 0, "srd", operation_view=False)  # the PFV engine's reason
    # the plain gradient through the same operations is exact: those methods still run
    assert torch.isfinite(srdxai.explain(model, x, 0, "gradient_x_input")).all()
