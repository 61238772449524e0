"""Maps made differentiable with respect to the input (``srdxai.engine.differentiable``).

The manipulation attack optimises the input through the map, so the map's derivative must be
the derivative of the very function the method computes: every method here is checked
against central finite differences of its own (ordinary, non-differentiable) output, on
smooth float64 models, in a random direction. A hidden ``detach`` or a rule left in place for
the second differentiation shows up as a wrong directional derivative.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import small_models as sm
import srdxai
from srdxai.engine import differentiable, is_differentiable
from srdxai.errors import UnsupportedOperationError
from srdxai.models.zoo import SmallVGG, small_vit

# method -> options; all run on a BatchNorm ResNet with SiLU (smooth, so that the finite
# differences of every method are well defined)
CNN_METHODS = {
    "gradient": {},
    "saliency": {},
    "gradient_x_input": {},
    "integrated_gradients": {"steps": 3},
    "smoothgrad": {"samples": 2},  # explicit noise below (it is otherwise seeded by x)
    "guided_backprop": {},
    "epsilon_lrp": {},
    "deeplift_rescale": {},
    "lrp_epsilon": {},
    "lrp_zplus": {},
    "lrp_epsilon_plus": {},
    "lrp_alpha_beta": {},
    "lrp_epsilon_gamma_box": {},
    "srd": {},
    "abslrp": {},
    "gradcam": {},
    "gradcam_pp": {},
    "xgradcam": {},
    "layercam": {},
    "scorecam": {},
    "ablationcam": {},
    "fullgrad": {},
    "occlusion": {"window": 3, "stride": 2},
}
VIT_METHODS = {"abslrp": {}, "attnlrp": {}, "cp_lrp": {}, "srd_tokens": {},
               "gradient_x_input": {}}


def _resnet() -> nn.Module:
    return sm.build_model("ResNetLike", "silu", seed=1, num_classes=4)


def _vgg() -> nn.Module:
    torch.manual_seed(2)
    return SmallVGG(num_classes=4, activation="gelu", widths=(4, 6), input_size=8).double().eval()


def _vit() -> nn.Module:
    torch.manual_seed(3)
    return small_vit(num_classes=4, image_size=16).double().eval()


def _check_directional_derivative(model, x, method, options, target=1, h=1e-6, rtol=2e-5):
    if method == "smoothgrad":
        g = torch.Generator().manual_seed(0)
        options = {**options, "noise": 0.1 * torch.randn((options["samples"], *x.shape),
                                                          generator=g, dtype=x.dtype)}
    plain = srdxai.explain(model, x, target, method, **options)
    assert plain.grad_fn is None and not plain.requires_grad
    xr = x.clone().requires_grad_(True)
    with differentiable():
        assert is_differentiable()
        m = srdxai.explain(model, xr, target, method, **options)
    assert not is_differentiable()
    assert m.grad_fn is not None, f"{method}: the map has no graph"
    torch.testing.assert_close(m.detach(), plain, rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(m.shape, generator=g, dtype=x.dtype)
    direction = torch.randn(x.shape, generator=g, dtype=x.dtype)
    (grad,) = torch.autograd.grad((m * weights).sum(), xr)
    analytic = float((grad * direction).sum())

    def score(t):
        return float((srdxai.explain(model, t, target, method, **options) * weights).sum())

    numeric = (score(x + h * direction) - score(x - h * direction)) / (2 * h)
    scale = max(abs(numeric), float(grad.abs().sum() * direction.abs().mean()), 1e-8)
    assert abs(analytic - numeric) <= rtol * scale, (method, analytic, numeric)
    # the rules switched to plain gradients for the second differentiation only: the next
    # ordinary call is unchanged
    torch.testing.assert_close(srdxai.explain(model, x, target, method, **options), plain,
                               rtol=0, atol=0)


# (model, input shape) per architecture: a BatchNorm ResNet (GAP + linear head); a flatten +
# dense head, where SRD starts from its Grad-CAM seed; the small ViT, where LayerNorm and
# softmax statistics are constants for the rules but not for the map
ARCHITECTURES = {"resnet": (_resnet, (2, 3, 10, 10)), "vgg": (_vgg, (2, 3, 8, 8)),
                 "vit": (_vit, (1, 3, 16, 16))}
CASES = ([("resnet", m, o) for m, o in sorted(CNN_METHODS.items())]
         + [("vgg", m, {}) for m in ("srd", "gradcam", "lrp_epsilon_plus", "abslrp")]
         + [("vit", m, o) for m, o in sorted(VIT_METHODS.items())])


@pytest.mark.parametrize(("architecture", "method", "options"), CASES,
                         ids=[f"{a}-{m}" for a, m, _ in CASES])
def test_map_derivative_matches_finite_differences(architecture, method, options):
    build, shape = ARCHITECTURES[architecture]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _check_directional_derivative(build(), x, method, options)


def test_relu_model_and_batching():
    """ReLU networks: the map is still differentiable (SRD through its sharing ratios);
    chunked batches keep the graph; the model comes back unchanged."""
    torch.manual_seed(0)
    model = sm.build_model("PoolNet", "relu", seed=0, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    with differentiable():
        m = srdxai.explain(model, x, 0, "srd", batch_size=2)
    (g,) = torch.autograd.grad(m.pow(2).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in model.parameters())
    assert all(not mod._forward_hooks and not mod._backward_hooks for mod in model.modules())


def test_attention_methods_refuse_clearly():
    model = _vit()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with differentiable(), pytest.raises(UnsupportedOperationError, match="differentiable"):
        srdxai.explain(model, x, 0, "attention_rollout")


def test_input_without_grad_still_gives_a_graph():
    model = _resnet()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    with differentiable():
        m = srdxai.explain(model, x, 0, "srd")
    assert m.requires_grad and not x.requires_grad


def test_no_tensors_survive_differentiable_calls():
    """The kept graphs hold rules and tensors; once the map is gone nothing may remain."""
    model = _resnet()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64, requires_grad=True)

    def count() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def run():
        for method in ("srd", "lrp_epsilon_plus", "abslrp", "gradcam", "guided_backprop"):
            with differentiable():
                m = srdxai.explain(model, x, 1, method)
            torch.autograd.grad(m.sum(), x)
            del m

    run()
    before = count()
    run()
    assert count() <= before
