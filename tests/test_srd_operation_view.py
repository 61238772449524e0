"""SRD on a model its PFV engine cannot decompose (a space-to-depth stem, as TResNet's; more
bias paths than ``max_paths``) runs on the operation view, every operation a layer, with an
``OperationViewWarning``: the map sums to the target logit, later calls take that route
without a warning, a model the PFV engine takes is never sent there, and a model neither view
decomposes gets one error with both reasons."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import OperationViewWarning, UnsupportedOperationError
from srdxai.methods import get_method
from srdxai.methods.srd_tokens import token_relevance

DT = torch.float64


class SpaceToDepth(nn.Module):
    """TResNet's stem: 4 x 4 pixels into channels with a view, a permute and a view (``form
    ="view"``), or ``F.pixel_unshuffle`` (its channels in another order)."""

    def __init__(self, form: str = "view", block: int = 2):
        super().__init__()
        self.form, self.block = form, block
        g = torch.Generator().manual_seed(0)
        channels = 3 * block * block
        self.conv = nn.Conv2d(channels, 6, 3, padding=1).double()
        self.se = nn.Conv2d(6, 6, 1).double()
        self.head = nn.Linear(6, 4).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)

    def stem(self, x):
        n, c, h, w = x.shape
        b = self.block
        if self.form == "view":  # channel index (i * b + j) * C + c
            x = x.view(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
            return x.reshape(n, c * b * b, h // b, w // b)
        return F.pixel_unshuffle(x, b)  # channel index c * b * b + i * b + j

    def forward(self, x):
        y = torch.relu(self.conv(self.stem(x)))
        y = y + y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))  # a gated residual
        return self.head(y.mean((2, 3)))


def _unshuffled_twin(model: SpaceToDepth) -> SpaceToDepth:
    """The same function with ``F.pixel_unshuffle``: the first conv's input channels reordered."""
    twin = SpaceToDepth("unshuffle", model.block)
    twin.load_state_dict(model.state_dict())
    b, c = model.block, 3
    # channel k of the view form is (i, j, c) with k = (i * b + j) * C + c; of the unshuffle
    # form (c, i, j) with k' = c * b * b + i * b + j
    order = [c_ * b * b + i * b + j for i in range(b) for j in range(b) for c_ in range(c)]
    weight = torch.empty_like(model.conv.weight)
    weight[:, order] = model.conv.weight.detach()
    with torch.no_grad():
        twin.conv.weight.copy_(weight)
    return twin


def test_a_model_the_pfv_engine_refuses_runs_on_the_operation_view_with_a_warning():
    model = SpaceToDepth().eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    with pytest.warns(OperationViewWarning, match="space|permute|operation view"):
        first = srdxai.explain(model, x, [1, 2], "srd")
    logits = model(x)[torch.arange(2), torch.tensor([1, 2])]
    torch.testing.assert_close(first.sum((1, 2)), logits, rtol=1e-10, atol=1e-12)
    srd = get_method("srd")(model)
    direct = token_relevance(srd, x, torch.tensor([1, 2])).sum(1)
    torch.testing.assert_close(first, direct, rtol=1e-12, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OperationViewWarning)  # remembered: no second warning
        torch.testing.assert_close(srdxai.explain(model, x, [1, 2], "srd"), first)


def test_space_to_depth_written_with_views_equals_pixel_unshuffle():
    """The view-permute-view stem moves each pixel's vector into the channels of its block as
    ``F.pixel_unshuffle`` does (in another channel order, undone by the conv's weights)."""
    model = SpaceToDepth().eval()
    twin = _unshuffled_twin(model).eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    torch.testing.assert_close(twin(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OperationViewWarning)
        torch.testing.assert_close(srdxai.explain(model, x, 0, "srd"),
                                   srdxai.explain(twin, x, 0, "srd"), rtol=1e-10, atol=1e-12)


def test_a_model_the_pfv_engine_decomposes_stays_there():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OperationViewWarning)
        ours = srdxai.explain(model, x, 1, "srd")
    srd = get_method("srd")(model)
    # the operation view gives another map here (it does not compose conv -> conv): the PFV
    # engine's is the one returned
    other = token_relevance(srd, x, torch.tensor([1, 1])).sum(1)
    assert (ours - other).abs().max() > 1e-6
    torch.testing.assert_close(ours, srd._explain(x, 1)[0])


def test_too_many_bias_paths_go_to_the_operation_view():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=DT)
    with pytest.warns(OperationViewWarning, match="paths"):
        ours = srdxai.SRD(model, max_paths=4).attribute(x, 0)
    torch.testing.assert_close(ours.sum(), model(x)[0, 0], rtol=1e-10, atol=1e-12)


class _Neither(nn.Module):
    """A product of two input-dependent maps that is no gate: refused by both views."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head((self.a(x) * self.b(x)).mean((2, 3)))


def test_a_model_neither_view_decomposes_gets_both_reasons():
    with pytest.raises(UnsupportedOperationError, match="operation view.*cannot decompose"):
        srdxai.explain(_Neither().eval(), torch.randn(1, 3, 8, 8), 0, "srd")


def test_a_flatten_head_with_the_logit_seed_stays_refused():
    """A dense layer on a flattened map joins the vectors of every position; neither view has
    a sharing ratio for it (the PFV engine's Grad-CAM seed starts below it)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 2)).eval()
    with pytest.raises(UnsupportedOperationError, match="flattened feature map"):
        srdxai.SRD(model, seed="logit").attribute(torch.randn(1, 3, 8, 8), 0)


def test_the_grad_cam_seed_on_such_a_model_gets_the_pfv_engines_reason():
    """The operation view starts from the logit only; after a logit-seed call went there, a
    Grad-CAM seed is refused for what the PFV engine cannot decompose (not as a transformer)."""
    model = SpaceToDepth().eval()
    x = torch.randn(1, 3, 8, 8, dtype=DT)
    with pytest.warns(OperationViewWarning):
        srdxai.explain(model, x, 0, "srd")
    with pytest.raises(UnsupportedOperationError, match="permute") as caught:
        srdxai.SRD(model, seed="gradcam").attribute(x, 0)
    assert "transformer" not in str(caught.value)


def _transposer():
    class Transposer(nn.Module):
        def forward(self, x):
            return x.transpose(2, 3)

    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Sequential(nn.Identity(), Transposer()),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["ReflectPad", "SpatialSwap", "Transposer"])
def test_what_the_pfv_engine_refuses_by_name_maps_on_the_operation_view(name):
    """The PFV engine's refusals of tests/test_engine.py and tests/test_channel_shuffle.py
    (which check them with operation_view=False): by default a conserving map, with the
    warning naming what the PFV engine could not decompose."""
    import test_channel_shuffle
    import test_engine

    torch.manual_seed(0)
    model = {"ReflectPad": lambda: test_engine.ReflectPad(),
             "SpatialSwap": lambda: test_channel_shuffle._randomised(
                 test_channel_shuffle.SpatialSwap(False, 2, 6), 0),
             "Transposer": _transposer}[name]().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    with pytest.warns(OperationViewWarning, match="PFV engine cannot decompose"):
        ours = srdxai.explain(model, x, 1, "srd", seed="logit")
    torch.testing.assert_close(ours.sum((1, 2)), model(x)[:, 1], rtol=1e-10, atol=1e-12)


def test_constant_channels_beside_input_dependent_ones_are_refused():
    """Constant channels concatenated to a map (tests/test_engine.py's ConstantConcat, a
    CoordConv's coordinates): relevance would reach the constant entries and be lost (the map
    summed to 8 % of the logit before this refusal); both views refuse, by name."""
    import test_engine

    model = test_engine.ConstantConcat().double().eval()
    with pytest.raises(UnsupportedOperationError, match="constant entries beside"):
        srdxai.explain(model, torch.randn(2, 3, 6, 6, dtype=DT), 1, "srd", seed="logit")


def test_a_map_that_lost_relevance_is_refused(monkeypatch):
    """The operation view's last guard on CNNs: with the refusal above switched off, the
    relevance lost on the constant channels makes the map miss the logit, and it is refused
    instead of returned."""
    import test_engine
    from srdxai.methods import srd_tokens

    monkeypatch.setattr(srd_tokens.SRDTokenRule, "_refuse_part_constant",
                        lambda *args: None)
    model = test_engine.ConstantConcat().double().eval()
    with pytest.raises(UnsupportedOperationError, match="sums to .* not to"):
        srdxai.explain(model, torch.randn(2, 3, 6, 6, dtype=DT), 1, "srd", seed="logit")
