"""Class activation maps: Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, Score-CAM, Ablation-CAM
and FullGrad.

Notation: ``A`` (N, C, h, w) is the activation at the target ``layer``, ``g = dS/dA`` the
gradient of the target score ``S`` (a logit, or a callable target's objective) with respect to
it, sums ``sum_ij`` run over the layer's spatial positions and ``sum_c`` over its channels.
Every map is

    ``M = upsample(relu(sum_c W_c * A_c))``,

with a method-specific weight ``W`` (per channel, or per channel and position for LayerCAM):
non-negative (not signed), summed over channels, shape (N, H, W), upsampled bilinearly to the
input size (``align_corners=False``, which is what OpenCV's ``resize`` does in
pytorch-grad-cam). FullGrad has its own formula (see :class:`FullGrad`).

``layer`` is a PFV layer as the engine names them (an activation output, or a module whose
output is one), ``"low"`` (the last spatial activation layer: ResNet ``layer4``, VGG16
``features.29``: the usual CAM layer) or ``"high"`` (one resolution step finer: ResNet
``layer3``, VGG16 ``features.22``; the LayerCAM paper's finer layer). A module object of the
model is accepted too. In pytorch-grad-cam terms the target layer is the module whose output is
that activation (``model.layer4[-1]`` for ``"low"`` on a ResNet).

Transformers (ViT, DeiT, Swin, no ``reshape_transform`` needed): when the model has no
convolutional feature map at ``layer``, ``"low"`` is the LayerNorm that feeds the last attention
(timm ViT ``blocks[-1].norm1``, the layer pytorch-grad-cam recommends: the final norm's patch
tokens get no gradient from a class-token head) and ``"high"`` the one feeding the attention
before; a module name whose output is tokens works too. Tokens ``(N, T, D)`` lose their
``prefix_tokens`` leading non-patch tokens (class, distillation, registers: found as the fewest
that leave a patch grid with the image's aspect ratio, or given) and are laid out on that
grid; Swin's channels-last ``(N, h, w, D)`` maps are read as they are. Ablation-CAM ablates a
channel of the patch tokens through a forward hook on that module.

Maps are not normalised by default. ``normalize=True`` gives pytorch-grad-cam's per-sample
min-max scaling ``(m - min m) / (max(m - min m) + 1e-7)``, applied where it applies it (for the
layer CAMs: on the layer map, and again after upsampling; the first is a positive affine map per
sample, so it changes the result only through the ``1e-7``), so the maps agree with
pytorch-grad-cam's to rounding.

Everything runs in torch on the model's device, in the model's dtype; Score-CAM's and
Ablation-CAM's extra forward passes are batched, ``internal_batch_size`` at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..engine import ops
from ..engine.core import Rule, Target, Trace, is_differentiable, keep_graph, target_gradient
from ..engine.graph import Node
from ..engine.memory import budget_chunk, run_in_chunks
from ..engine.optrace import OpRule, OpTrace
from ..engine.positions import PositionTags
from ..engine.vector_axes import AxisProbe
from ..errors import InvalidInputError, UnsupportedOperationError
from . import options
from .base import Method, register
from .srd_tokens import model_has_attention

Tensor = torch.Tensor

MINMAX_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


# --- shared pieces ---------------------------------------------------------------------------

class _ActivationRule(Rule):
    """Plain gradients, with the PFV values kept so the layer's activation can be read."""

    keeps_pfv_values = True


def _minmax(m: Tensor, eps: float = MINMAX_EPS, dims: int = 1) -> Tensor:
    """Per-map min-max scaling over all but the first ``dims`` dimensions (pytorch-grad-cam)."""
    flat = m.flatten(dims)
    low = flat.amin(-1).reshape(*m.shape[:dims], *([1] * (m.dim() - dims)))
    shifted = m - low
    high = shifted.flatten(dims).amax(-1).reshape(low.shape)
    return shifted / (high + eps)


def _upsample(m: Tensor, size: tuple[int, ...], align_corners: bool = False) -> Tensor:
    """Bilinear (linear, trilinear) upsampling of (B, *spatial) maps to ``size``."""
    if tuple(m.shape[1:]) == tuple(size):
        return m
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(m.unsqueeze(1), size=tuple(size), mode=mode,
                         align_corners=align_corners)[:, 0]


def _spatial_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.dim()))


def _layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    if isinstance(layer, str):
        return layer
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name
        raise InvalidInputError("the layer module given is not part of the model.")
    raise InvalidInputError(
        f"layer must be a layer name, 'low', 'high' or a module of the model; got {layer!r}.")


def _layer_node(trace: Trace, layer: str, input_dim: int) -> Node:
    """The PFV node of ``layer``: a feature map with the input's number of dimensions."""

    def is_map(n: Node) -> bool:
        return n.spatial and len(n.shape) == input_dim

    if layer in ("low", "high") and not any(is_map(n) for n in trace.pfv_layers[1:]):
        raise InvalidInputError(
            f"layer='{layer}': the model has no activation layer with the input's spatial "
            "layout, so there is no feature map for a CAM. CAM methods need a convolutional "
            "network (a vision transformer's (N, tokens, dim) tensors are not feature maps; "
            "use a gradient or LRP method there).")
    node = trace.find_layer(layer)
    if not is_map(node):
        raise InvalidInputError(
            f"layer '{layer}' (PFV layer '{node.name}', shape {tuple(node.shape)}) is not a "
            f"feature map with the input's {input_dim - 2} spatial dimension(s); CAM methods "
            "need one, (N, C, H, W) for images, such as a convolutional layer's activation, "
            "e.g. layer='low'.")
    return node


class _TokenLayer:
    """A transformer layer read as a feature map: the output of module ``name``, tokens
    ``(N, T, D)`` with ``prefix`` leading non-patch tokens (class, distillation, register
    tokens) and a ``grid`` of patches, or a channels-last map ``(N, h, w, D)`` (Swin).

    ``to_map`` gives ``(N, D, h, w)``; ``to_tokens`` puts such a map back into a copy of the
    module output (Ablation-CAM's ablated channels)."""

    def __init__(self, name: str, module: nn.Module, prefix: int, grid: tuple[int, ...] | None):
        self.name, self.module, self.prefix, self.grid = name, module, prefix, grid

    def to_map(self, t: Tensor) -> Tensor:
        if self.grid is None:  # channels-last map
            return t.movedim(-1, 1)
        n, _, d = t.shape
        return t[:, self.prefix:].reshape(n, *self.grid, d).movedim(-1, 1)

    def to_tokens(self, m: Tensor, like: Tensor) -> Tensor:
        if self.grid is None:
            return m.movedim(1, -1).to(like.dtype)
        out = like.clone()
        out[:, self.prefix:] = m.movedim(1, -1).reshape(m.shape[0], -1, m.shape[1])
        return out


def _token_grid(tokens: int, size: tuple[int, ...],
                prefix: int | None) -> tuple[int, tuple[int, ...]] | None:
    """(prefix tokens, patch grid) for ``tokens`` tokens of an image of ``size``: the grid
    has the image's aspect ratio; without ``prefix`` the fewest leading tokens (0-8) that
    leave such a grid."""
    candidates = [prefix] if prefix is not None else range(min(tokens, 9))
    for p in candidates:
        patches = tokens - p
        if len(size) != 2 or patches <= 0:
            continue
        h, w = size
        for rows in range(1, patches + 1):
            if patches % rows == 0 and rows * w == (patches // rows) * h:
                return p, (rows, patches // rows)
    return None


def _find_token_layer(model: nn.Module, x: Tensor, layer: str,
                      prefix: int | None) -> _TokenLayer:
    """The transformer layer a CAM reads: ``"low"``, the LayerNorm that feeds the last
    attention (timm ViT ``blocks[-1].norm1``, the layer pytorch-grad-cam recommends: the
    final norm's patch tokens get no gradient from a class-token head); ``"high"`` the one
    feeding the attention before; or a module name whose output is tokens or a channels-last
    map."""
    modules = dict(model.named_modules())
    if layer in ("low", "high"):
        leaf = x.detach()
        probe = AxisProbe(leaf)
        with torch.no_grad(), OpTrace(model, leaf, probe) as trace:
            trace.forward()
            calls = [(c.kind, c.name, c.grouped, probe.axes.mixes_tokens(c) is not None)
                     for c in trace.calls]
        feeding = []
        last_norm = None
        for kind, name, grouped, mixing in calls:
            if kind == "layer_norm" and not grouped:  # a GroupNorm is no token layer
                last_norm = name
            elif (kind == "softmax" or mixing) and last_norm is not None:
                # an attention's softmax, or an MLP-Mixer's dense layer over the tokens
                if not feeding or feeding[-1] != last_norm:
                    feeding.append(last_norm)
        want = 1 if layer == "low" else 2
        if len(feeding) < want:
            raise InvalidInputError(
                f"layer='{layer}': the model has no activation layer with the input's spatial "
                "layout and no LayerNorm feeding an attention or a dense layer over the tokens, "
                "so there is no feature map for "
                "a CAM; pass layer= a module whose output is tokens (N, T, D) or a "
                "channels-last map (N, h, w, D).")
        name = feeding[-want]
    else:
        name = layer
    if name not in modules:
        raise InvalidInputError(f"unknown layer '{name}': not a module of the model.")
    captured: list[Tensor] = []
    handle = modules[name].register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.no_grad():
            model(x[:1].detach())
    finally:
        handle.remove()
    out = captured[0] if captured else None
    size = tuple(x.shape[2:])
    if isinstance(out, Tensor) and out.dim() == 3:
        found = _token_grid(out.shape[1], size, prefix)
        if found is not None:
            return _TokenLayer(name, modules[name], found[0], found[1])
    if isinstance(out, Tensor) and out.dim() == 4 and len(size) == 2 and (
            out.shape[1] * size[1] == out.shape[2] * size[0]):
        return _TokenLayer(name, modules[name], 0, None)
    raise InvalidInputError(
        f"layer '{name}' gives {getattr(out, 'shape', type(out).__name__)}, not tokens "
        f"(N, T, D) forming a patch grid of a {size} image after a few prefix tokens, nor a "
        "channels-last map (N, h, w, D); set prefix_tokens= or choose another layer.")


def _has_feature_map(trace: Trace, input_dim: int) -> bool:
    return any(n.spatial and len(n.shape) == input_dim for n in trace.pfv_layers[1:])


def _objective(out: Tensor, target: Target, classes: Tensor | None,
               rows: Tensor | None = None) -> Tensor:
    """One score per row of ``out``: the target logit, or a callable target's objective.

    ``rows`` maps each row of ``out`` to its sample (for Score-/Ablation-CAM's copies)."""
    if classes is None:
        return target(out)
    c = classes if rows is None else classes[rows]
    return out.gather(1, c[:, None])[:, 0]


class _LayerCAM(Method):
    """Shared constructor, layer lookup and post-processing of the layer CAMs."""

    signed = False
    needs_smooth_activations = True  # gradients (or scores) through ReLUs above the layer

    def __init__(self, model: nn.Module, layer: str | nn.Module = "low",
                 batch_size: int | None = None, channels_last: bool | None = None,
                 normalize: bool = False, prefix_tokens: int | None = None):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        self.layer = _layer_name(model, layer)
        self.normalize = options.flag(normalize, "normalize")
        # None: found from the token count
        self.prefix_tokens = options.integer(prefix_tokens, "prefix_tokens", minimum=0,
                                             optional=True)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        """The CAM of ``self.layer``, upsampled to the input size: (N, H, W)."""
        return self.attribute_layer(inputs, target, self.layer, upsample=True)

    def attribute_layer(self, inputs: Tensor, target: Target = None,
                        layer: str | nn.Module = "low", upsample: bool = True) -> Tensor:
        """The CAM of ``layer`` (N, h, w), upsampled to the input size unless
        ``upsample=False``; what ``srdxai.explain(..., method=NAME, layer=...)`` calls."""
        name = _layer_name(self.model, layer)

        def one(x: Tensor, t: Target) -> Tensor:
            size = tuple(x.shape[2:]) if upsample else None
            return self._with_layout(x, lambda leaf: self._map(leaf, t, name, size))

        return self._batched(inputs, target, one)

    def _map(self, x: Tensor, target: Target, layer: str,
             size: tuple[int, ...] | None) -> Tensor:
        raise NotImplementedError

    def _finish(self, cam: Tensor, size: tuple[int, ...] | None) -> Tensor:
        """relu, (min-max), upsample, (min-max): pytorch-grad-cam's post-processing."""
        cam = cam.clamp_min(0)
        if self.normalize:
            cam = _minmax(cam)
        if size is not None:
            cam = _upsample(cam, size)
        if self.normalize:
            cam = _minmax(cam)
        return keep_graph(cam).contiguous()

    def _token_layer(self, trace: Trace, x: Tensor, layer: str) -> _TokenLayer | None:
        """The transformer layer to read when ``trace`` (the recorded pass) has no
        convolutional feature map for ``layer`` (ViT, DeiT, Swin), else None."""
        if layer in ("low", "high"):
            if _has_feature_map(trace, x.dim()):
                return None
        elif layer in {n.name for n in trace.pfv_layers} or layer in trace.module_outputs:
            return None
        elif layer not in dict(self.model.named_modules()):
            return None  # find_layer's error lists the layers
        return _find_token_layer(self.model, x, layer, self.prefix_tokens)

    def _token_activations(self, x: Tensor, target: Target, tokens: _TokenLayer,
                           grad: bool):
        captured: list[Tensor] = []
        with self._guard(), torch.set_grad_enabled(grad or is_differentiable()):
            handle = tokens.module.register_forward_hook(lambda m, a, o: captured.append(o))
            try:
                out = self.model(x)
            finally:
                handle.remove()
            t = captured[-1]
            grad_out, classes = target_gradient(out, target)
            g = None
            if grad:
                (g,) = self._grad(out, t, grad_out)
                g = keep_graph(tokens.to_map(g))
            return keep_graph(tokens.to_map(t)), g, keep_graph(out), classes

    def _activations(self, x: Tensor, target: Target, layer: str, grad: bool):
        """(A, dS/dA or None, model output, target classes or None) at ``layer``."""
        rule = _ActivationRule()
        with self._guard(), torch.set_grad_enabled(grad or is_differentiable()), Trace(
                self.model, x, rule) as trace:
            out = trace.forward()
            tokens = self._token_layer(trace, x, layer)
            if tokens is None:
                node = _layer_node(trace, layer, x.dim())
                a = node.tensor
                grad_out, classes = target_gradient(out, target)
                g = None
                if grad:
                    (g,) = self._grad(out, a, grad_out)
                    g = keep_graph(g)
                return keep_graph(a), g, keep_graph(out), classes
            del out
        return self._token_activations(x, target, tokens, grad)


class _GradientCAM(_LayerCAM):
    """CAMs computed from one forward and one backward pass to the layer."""

    family = "cam"

    def _map(self, x: Tensor, target: Target, layer: str,
             size: tuple[int, ...] | None) -> Tensor:
        a, g, _, _ = self._activations(x, target, layer, grad=True)
        return self._finish(self._combine(a, g), size)

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        """The channel sum ``sum_c W_c A_c`` (N, *spatial), before the relu."""
        raise NotImplementedError


@register("gradcam")
class GradCAM(_GradientCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    ``W_c = mean_ij g_cij`` (global-average-pooled gradient);
    ``M = upsample(relu(sum_c W_c A_c))``. Not signed (relu), summed over channels, (N, H, W).
    Options: ``layer`` (default ``"low"``), ``normalize`` (pytorch-grad-cam's min-max scaling).
    """

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        w = g.mean(_spatial_dims(g), keepdim=True)
        return (w * a).sum(1)


@register("gradcam_pp")
class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018), closed form of their Eq. 19.

    ``alpha_cij = g^2 / (2 g^2 + (sum_ij A_cij) g^3 + eps)`` where ``g_cij != 0`` (else 0),
    ``W_c = sum_ij alpha_cij relu(g_cij)``, ``M = upsample(relu(sum_c W_c A_c))``, with
    ``g`` the gradient of the score itself (the paper's exponential-score derivation reduced to
    first derivatives, as every implementation does) and ``eps = 1e-6`` as in pytorch-grad-cam.
    Not signed, summed over channels, (N, H, W).
    """

    eps = 1e-6

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        dims = _spatial_dims(g)
        g2 = g * g
        g3 = g2 * g
        total = a.sum(dims, keepdim=True)
        alpha = g2 / (2 * g2 + total * g3 + self.eps)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (g.clamp_min(0) * alpha).sum(dims, keepdim=True)
        return (w * a).sum(1)


@register("xgradcam")
class XGradCAM(_GradientCAM):
    """XGrad-CAM (Fu et al., BMVC 2020).

    ``W_c = sum_ij g_cij A_cij / (sum_ij A_cij + eps)`` (``eps = 1e-7`` as in
    pytorch-grad-cam), ``M = upsample(relu(sum_c W_c A_c))``. Not signed, summed over
    channels, (N, H, W).
    """

    eps = 1e-7

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        dims = _spatial_dims(g)
        w = (g * a / (a.sum(dims, keepdim=True) + self.eps)).sum(dims, keepdim=True)
        return (w * a).sum(1)


@register("layercam")
class LayerCAM(_GradientCAM):
    """LayerCAM (Jiang et al., IEEE TIP 2021).

    Per position weights ``W_cij = relu(g_cij)``: ``M = upsample(relu(sum_c relu(g_c) A_c))``.
    Not signed, summed over channels, (N, H, W). ``layer="high"`` gives the paper's maps
    from a finer layer.
    """

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        return (g.clamp_min(0) * a).sum(1)


# Automatic internal batch on the CPU: about this many input values per forward pass. Large
# batches of large images run slower per image there (cache): ResNet50 at 224x224, 2 cores,
# channels-last, 37 / 30 / 23 images/s at batch 8 / 16 / 64, EfficientNet-Lite0 66 / 73 / 44;
# small images want large batches (ResNet18 at 32x32: 1190 / 1989 / 3662).
CPU_VALUES_PER_PASS = 2**21
CPU_MAX_PASSES = 256
ACCELERATOR_PASSES = 64


class _PerturbationCAM(_LayerCAM):
    """Score-CAM and Ablation-CAM: channel weights from extra, batched forward passes.

    ``internal_batch_size``: how many masked / ablated copies one forward pass takes. None
    (default): 64 on an accelerator; on the CPU as many as hold about 2M input values (13 for
    3x224x224 inputs, at most 256), which ran fastest there.
    """

    family = "cam"

    def __init__(self, model: nn.Module, layer: str | nn.Module = "low",
                 batch_size: int | None = None, channels_last: bool | None = None,
                 normalize: bool = False, internal_batch_size: int | None = None,
                 progress: bool = False, prefix_tokens: int | None = None):
        super().__init__(model, layer=layer, batch_size=batch_size,
                         channels_last=channels_last, normalize=normalize,
                         prefix_tokens=prefix_tokens)
        self.internal_batch_size = options.integer(internal_batch_size, "internal_batch_size",
                                                   optional=True)
        self.progress = options.flag(progress, "progress")

    def _passes(self, x: Tensor) -> int:
        if self.internal_batch_size is not None:
            return self.internal_batch_size
        if x.device.type != "cpu":
            return ACCELERATOR_PASSES
        return max(1, min(CPU_MAX_PASSES, CPU_VALUES_PER_PASS // x[0].numel()))

    def _for_chunks(self, n: int, c: int, x: Tensor,
                    run: Callable[[Tensor, Tensor], None], pairs: Tensor | None = None) -> None:
        """``run(rows, channels)`` on (sample, channel) index pairs, sample-major, one forward
        pass's worth at a time: ``internal_batch_size`` copies, capped by a
        :func:`~srdxai.engine.memory.memory_budget` and halved when a pass runs out of memory.

        ``pairs``: the flat ``sample * c + channel`` indices to visit (default: all)."""
        if pairs is None:
            pairs = torch.arange(n * c, device=x.device)
        step = budget_chunk(self.model, x, self._passes(x), backward=is_differentiable())
        with tqdm(total=pairs.numel(), desc=self.name, disable=not self.progress,
                  unit="copy") as bar:

            def one(start: int, stop: int) -> None:
                flat = pairs[start:stop]
                run(flat // c, flat % c)
                bar.update(stop - start)

            run_in_chunks(pairs.numel(), step, one, self.name)


_SCORE_PRECISIONS = {"full": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register("scorecam")
class ScoreCAM(_PerturbationCAM):
    """Score-CAM (Wang et al., CVPR-W 2020), in pytorch-grad-cam's form.

    Each channel, upsampled to the input and min-max scaled to [0, 1],
    ``H_c = (up(A_c) - min) / (max - min + 1e-8)``, masks the input; its weight is the softmax
    over channels of the masked scores, ``W = softmax_c(S(x * H_c))``;
    ``M = upsample(relu(sum_c W_c A_c))``. Not signed, summed over channels, (N, H, W).

    As pytorch-grad-cam: the masks are upsampled with ``align_corners=True`` (its
    ``UpsamplingBilinear2d``), the score is the target logit (not the softmax probability),
    and there is no baseline subtraction (the paper's ``S(x * H_c) - S(x_b)`` has the same
    softmax over channels). The N*C masked copies run ``internal_batch_size`` at a time (see
    :class:`_PerturbationCAM`) on the model's device, masks built per batch.

    A channel that is constant over the layer's positions (a dead ReLU channel, often 30-50 %
    of a VGG16 ``features.29``) has the all-zero mask: its masked input is the zero image for
    every such channel of every sample, so the model runs on it once instead of once per
    channel. For a nonzero constant the exact mask is zero too; pytorch-grad-cam can get
    rounding noise from its upsampling there instead.

    ``precision``: ``"full"`` (default) runs the masked passes in the input's dtype and gives
    pytorch-grad-cam's maps to 1e-5. ``"bfloat16"`` / ``"float16"`` run them under
    ``torch.autocast``: about 2x faster on CPUs with bf16 units and on GPUs, but the scores
    carry about 1e-2 relative error, so the maps differ from the full-precision ones (the
    benchmark reports by how much). The layer activations and the final map stay full precision.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module = "low",
                 batch_size: int | None = None, channels_last: bool | None = None,
                 normalize: bool = False, internal_batch_size: int | None = None,
                 progress: bool = False, precision: str = "full",
                 prefix_tokens: int | None = None):
        super().__init__(model, layer=layer, batch_size=batch_size,
                         channels_last=channels_last, normalize=normalize,
                         internal_batch_size=internal_batch_size, progress=progress,
                         prefix_tokens=prefix_tokens)
        if not isinstance(precision, str) or precision not in _SCORE_PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(_SCORE_PRECISIONS)}, "
                                    f"got {precision!r}")
        self.precision = precision

    def _score_pass(self, x: Tensor) -> Tensor:
        dtype = _SCORE_PRECISIONS[self.precision]
        if dtype is None:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=dtype):
            return self.model(x).float()

    def _map(self, x: Tensor, target: Target, layer: str,
             size: tuple[int, ...] | None) -> Tensor:
        a, _, _, classes = self._activations(x, target, layer, grad=False)
        n, c = a.shape[:2]
        spatial = tuple(x.shape[2:])
        scores = x.new_empty(n, c)
        xd = keep_graph(x)
        flat = a.flatten(2)
        live = (flat.amax(2) > flat.amin(2)).flatten()
        with self._guard(), torch.set_grad_enabled(is_differentiable()):
            if not bool(live.all()):
                zero_out = self._score_pass(torch.zeros_like(xd[:1]))
                zero_score = _objective(zero_out.expand(n, *zero_out.shape[1:]), target,
                                        classes).to(x.dtype)
                scores[:] = zero_score[:, None]
            pairs = live.nonzero()[:, 0]

            def masked_scores(rows: Tensor, channels: Tensor) -> None:
                up = _upsample(a[rows, channels], spatial, align_corners=True)
                low = up.flatten(1).amin(1).reshape(-1, *([1] * len(spatial)))
                high = up.flatten(1).amax(1).reshape(low.shape)
                mask = (up - low) / (high - low + 1e-8)
                out = self._score_pass(xd[rows] * mask.unsqueeze(1))
                scores[rows, channels] = _objective(out, target, classes, rows).to(x.dtype)

            self._for_chunks(n, c, x, masked_scores, pairs)
        w = torch.softmax(scores, dim=1)
        cam = (w.reshape(n, c, *([1] * len(spatial))) * a).sum(1)
        return self._finish(cam, size)


@register("ablationcam")
class AblationCAM(_PerturbationCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020).

    ``W_c = (S - S_c) / S`` with ``S_c`` the score when channel ``c`` of the layer's
    activation is set to zero (the network after the layer rerun on the ablated activation),
    ``M = upsample(relu(sum_c W_c A_c))``. Not signed, summed over channels, (N, H, W). Where
    ``S == 0`` the drop ``S - S_c`` is used unscaled; a negative ``S`` flips the weights' sign
    (as in the paper's formula and pytorch-grad-cam).

    Channels are always ablated to zero, as in the paper. pytorch-grad-cam does the same when
    the layer's minimum is 0 (the usual ReLU layer) but otherwise writes very negative values
    (``min - 1e7``, accumulating over its batch), so the two differ on such layers.

    The N*C ablated copies run ``internal_batch_size`` at a time. Each pass is a
    recorded forward pass of the whole model whose activation at the layer is replaced (the
    engine's ``Trace(..., on_activation=...)`` hook), so the part before the layer is
    recomputed, as in
    pytorch-grad-cam.
    """

    def _map(self, x: Tensor, target: Target, layer: str,
             size: tuple[int, ...] | None) -> Tensor:
        rule = _ActivationRule()
        grad = is_differentiable()
        with self._guard(), torch.set_grad_enabled(grad), Trace(self.model, x, rule) as trace:
            out = trace.forward()
            tokens = self._token_layer(trace, x, layer)
            if tokens is not None:
                del out
                trace.close()
                return self._token_map(x, target, tokens, size)
            node = _layer_node(trace, layer, x.dim())
            position = trace.pfv_layers.index(node) - 1  # -1: the input is not an activation
            a = keep_graph(node.tensor)
            _, classes = target_gradient(out, target)
            original = _objective(keep_graph(out), target, classes)
            del out
        n, c = a.shape[:2]
        ablated = x.new_empty(n, c)
        xd = keep_graph(x)
        with self._guard(), torch.set_grad_enabled(grad):

            def ablated_scores(rows: Tensor, channels: Tensor) -> None:
                value = a[rows].clone()
                value[torch.arange(rows.numel(), device=x.device), channels] = 0
                if position < 0:  # the layer is the input itself
                    out = self.model(value)
                else:
                    replaced = []

                    def replace(index: int, name: str, v: Tensor) -> Tensor | None:
                        if index != position:
                            return None
                        if v.shape != value.shape:
                            raise UnsupportedOperationError(
                                f"the activation at the ablated layer has shape "
                                f"{tuple(v.shape)} in the ablation pass but "
                                f"{tuple(value.shape)} was expected; the model's control "
                                "flow depends on the input.")
                        replaced.append(True)
                        return value

                    with Trace(self.model, xd[rows], Rule(), on_activation=replace) as rt:
                        out = rt.forward()
                        if not replaced:
                            raise UnsupportedOperationError(
                                f"layer '{layer}' was not reached in the ablation pass; "
                                "the model's control flow depends on the input.")
                ablated[rows, channels] = _objective(out, target, classes, rows).to(x.dtype)
                del out

            self._for_chunks(n, c, x, ablated_scores)
        return self._weighted(a, original, ablated, size)

    def _weighted(self, a: Tensor, original: Tensor, ablated: Tensor,
                  size: tuple[int, ...] | None) -> Tensor:
        n, c = a.shape[:2]
        drop = original[:, None] - ablated
        scale = torch.where(original != 0, original, torch.ones_like(original))[:, None]
        w = drop / scale
        cam = (w.reshape(n, c, *([1] * (a.dim() - 2))) * a).sum(1)
        return self._finish(cam, size)

    def _token_map(self, x: Tensor, target: Target, tokens: _TokenLayer,
                   size: tuple[int, ...] | None) -> Tensor:
        """Ablation-CAM on a transformer layer: the module's output with one channel of the
        patch tokens zeroed replaces the real one (a forward hook) in each ablated pass."""
        a, _, out, classes = self._token_activations(x, target, tokens, grad=False)
        original = _objective(out, target, classes)
        n, c = a.shape[:2]
        ablated = x.new_empty(n, c)
        xd = keep_graph(x)
        with self._guard(), torch.set_grad_enabled(is_differentiable()):

            def ablated_scores(rows: Tensor, channels: Tensor) -> None:
                value = a[rows].clone()
                value[torch.arange(rows.numel(), device=x.device), channels] = 0

                def replace(module, args, output):
                    return tokens.to_tokens(value, output)

                handle = tokens.module.register_forward_hook(replace)
                try:
                    result = self.model(xd[rows])
                finally:
                    handle.remove()
                ablated[rows, channels] = _objective(result, target, classes, rows).to(x.dtype)

            self._for_chunks(n, c, x, ablated_scores)
        return self._weighted(a, original, ablated, size)


# --- FullGrad --------------------------------------------------------------------------------

class _BiasGradientRule(Rule):
    """Plain gradients; collects the FullGrad bias maps of every spatial bias operation.

    LayerNorm / GroupNorm are recorded with their shift ``beta - mean * gamma / std`` as a
    bias (as BatchNorm's), gates as products: the rule is plain from the start, so every
    backward is the true gradient."""

    wants_bias_ops = True
    gate_products = True
    constant_statistics = True
    plain = True

    def __init__(self, input_dim: int, batch: int) -> None:
        self.maps: dict[tuple[int, ...], Tensor] = {}  # spatial size -> summed channel maps
        self.input_dim = input_dim
        self.batch = batch
        self.unmapped: list[tuple[int, ...]] = []  # biases on tensors that are not maps
        # set once the map's gradient is taken: a later differentiation of a differentiable
        # map runs through the same tensors and must not add to the maps again
        self.closed = False

    def on_opaque(self, op: ops.OpaqueOp, out: Tensor) -> None:
        # a bias inside an operation the engine does not decompose (a dense layer on a
        # transformer's tokens): its bias gradient cannot be placed, and leaving it out would
        # silently drop a term of the sum
        if op.has_bias:
            self.unmapped.append(tuple(out.shape))

    def on_bias_op(self, op: ops.LinearOp, out: Tensor) -> Tensor:
        # a map of another rank, or one whose first dimension is not the batch (windows or
        # patches folded into it, as Swin and MobileViT do), has no place in the image
        if out.shape[0] != self.batch or out.dim() > 2 and out.dim() != self.input_dim:
            self.unmapped.append(tuple(out.shape))
        elif out.dim() > 2 and out.requires_grad:
            out.register_hook(lambda g, op=op: self._collect(op, g))
        return out

    def _collect(self, op: ops.LinearOp, grad: Tensor) -> None:
        if self.closed:
            return None
        bias_grad = (op.bias.to(grad.dtype) * grad).abs()
        summed = _minmax(bias_grad, dims=2).sum(1)  # per channel, then over channels
        key = tuple(summed.shape[1:])
        prev = self.maps.get(key)
        self.maps[key] = summed if prev is None else prev + summed
        return None


class _TokenBiasGradients:
    """FullGrad's bias maps on the operation view, for transformers: every dense layer,
    LayerNorm (its shift ``beta - mean * gamma / std`` per token, as the CNN rule records it),
    convolution and BatchNorm gets ``psi(|b * dS/d(output)|)`` on its own grid of the image.

    Where each output entry sits comes from the position tags of ``engine/positions.py``,
    which travel through the calls that move values, so windows (Swin, with its cyclic
    shifts), patches (MobileViT) or tokens (LeViT's BatchNorm on ``(N * T, C)``) folded into
    the batch are put back where they belong; prefix tokens (class, distillation, register),
    which have no place in the image, are dropped. A layer's grid has the image's aspect
    ratio and one cell per output position of a sample. Biases on entries whose place is
    unknown (made by a call the operation view has no kind for), or whose positions do not
    form such a grid, are listed in ``unmapped``."""

    def __init__(self, size: tuple[int, ...], batch: int):
        self.size, self.batch = size, batch
        self.positions = PositionTags()
        self.maps: dict[tuple[int, ...], Tensor] = {}
        self.unmapped: list[tuple[int, ...]] = []
        self.closed = False

    def rule(self) -> _CollectingRule:
        return _CollectingRule(self)

    def start(self, x: Tensor) -> None:
        self.positions.start(x)

    def on_call(self, call, inputs, out: Tensor) -> None:
        if call.kind == "layer_norm" and call.grouped:
            raise UnsupportedOperationError(
                f"FullGrad on a model with attention has no bias map for a GroupNorm (in "
                f"module '{call.name}'): its shift per group is not placed on the image. "
                "Explain the model with another method (Grad-CAM, gradient x input, absLRP).")
        bias = self._bias(call, inputs)
        if bias is None or not out.requires_grad:
            return
        if out.dim() <= 2 and out.shape[0] == self.batch:
            return  # a pooled vector or the logits: no spatial map (as in the CNN rule)
        channel = 1 if call.kind in ("conv", "batch_norm") else out.dim() - 1
        placement = self._placement(out, channel)
        if placement is None:
            self.unmapped.append(tuple(out.shape))
            return
        if placement == "nowhere":
            return  # only entries without a place (prefix tokens)
        out.register_hook(lambda g, b=bias, c=channel, p=placement: self._collect(b, g, c, p))

    def _placement(self, out: Tensor, channel: int) -> tuple | str | None:
        """(valid entries, their cells, grid) for the output's positions; "nowhere" when no
        entry has a place; None when they cannot be placed."""
        tags = self.positions.of(out)
        if tags is None or len(self.size) != 2:
            return None
        sample, row, col = (t.movedim(channel, -1).mean(-1).reshape(-1) for t in tags)
        if bool((sample.isneginf() | row.isneginf() | col.isneginf()).any()):
            return None
        valid = ~(sample.isnan() | row.isnan() | col.isnan())
        if not bool(valid.any()):
            return "nowhere"
        index = valid.nonzero().squeeze(1)
        sample, row, col = sample[index], row[index], col[index]
        counts = torch.bincount(sample.round().long().clamp(min=0), minlength=self.batch)
        count = int(counts[0])
        if counts.numel() != self.batch or bool((counts != count).any()):
            return None
        height, width = self.size
        rows = max(1, round(math.sqrt(count * height / width)))
        cols = count // rows
        if rows * cols != count:
            return None
        cell_y = (row / (height / rows)).floor().long().clamp(0, rows - 1)
        cell_x = (col / (width / cols)).floor().long().clamp(0, cols - 1)
        cells = (sample.round().long() * rows + cell_y) * cols + cell_x
        if cells.unique().numel() != cells.numel():
            return None  # two entries of one channel on one cell
        return index, cells, (rows, cols)

    @staticmethod
    def _bias(call, inputs) -> Tensor | None:
        if call.kind == "linear":
            return call.argument(2, "bias")
        if call.kind == "conv":
            bias = call.argument(2, "bias")
            if bias is None:
                return None
            return bias.reshape(1, -1, *([1] * (inputs[0].dim() - 2)))
        if call.kind == "layer_norm":
            weight, beta = call.argument(2, "weight"), call.argument(3, "bias")
            eps = call.argument(4, "eps", 1e-5)
            normalized = call.argument(1, "normalized_shape")
            dims = tuple(range(-len(normalized), 0)) if isinstance(
                normalized, list | tuple) else (-1,)
            x = inputs[0].detach()
            mean = x.mean(dims, keepdim=True)
            std = (x.var(dims, keepdim=True, unbiased=False) + eps).sqrt()
            shift = -mean / std * (weight if weight is not None else 1.0)
            return shift + beta if beta is not None else shift
        if call.kind == "batch_norm":
            affine = call.batch_norm_affine()
            if affine is None:
                return None
            return affine[1].reshape(1, -1, *([1] * (inputs[0].dim() - 2)))
        return None

    def _collect(self, bias: Tensor, grad: Tensor, channel: int, placement: tuple) -> None:
        if self.closed:
            return None
        index, cells, (rows, cols) = placement
        values = (bias.to(grad.dtype) * grad).abs().movedim(channel, -1)
        values = values.reshape(-1, values.shape[-1])[index]
        grid = values.new_zeros(self.batch * rows * cols, values.shape[-1])
        grid = grid.index_copy(0, cells, values).reshape(self.batch, rows, cols, -1)
        summed = _minmax(grid.movedim(-1, 1), dims=2).sum(1)
        key = tuple(summed.shape[1:])
        prev = self.maps.get(key)
        self.maps[key] = summed if prev is None else prev + summed
        return None


class _CollectingRule(OpRule):
    """The operation-view rule of :class:`_TokenBiasGradients`: every backward is autograd's
    (plain gradients); each call is shown to the position tags and to the collector. A class
    of the module, not one made per call: a class is a reference cycle, and one made in a
    method would keep the collector's maps alive until a full garbage collection."""

    unknown = "gradient"

    def __init__(self, collector: _TokenBiasGradients):
        self.collector = collector

    def on_call(self, call, inputs, output):
        self.collector.positions.on_call(call, inputs, output)
        self.collector.on_call(call, inputs, output)
        return output

    def on_move(self, func, args, kwargs, output):
        self.collector.positions.on_move(func, args, kwargs, output)


@register("fullgrad")
class FullGrad(Method):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019), post-processed as pytorch-grad-cam.

    ``M = sum_c psi(|x * dS/dx|_c) + sum_l sum_c upsample(psi(|b_lc * dS/db_lc|))``:
    the input-gradient term plus, for every operation with a bias and a spatial output
    (convolutions, dense layers on a channels-last map, BatchNorm, whose bias is
    ``beta - mean * gamma / sqrt(var + eps)``, LayerNorm / GroupNorm, whose bias is their
    shift ``beta - mean * gamma / std`` per position or group; also constant shifts the engine
    records), the bias-gradient map ``b * dS/d(output)``. ``psi``
    is the absolute value followed by min-max scaling per sample *and channel* (eps 1e-7);
    maps are upsampled bilinearly (``align_corners=False``). Not signed, summed over channels
    and layers, (N, H, W); ``normalize=True`` scales each map to [0, 1] as pytorch-grad-cam.

    Differences: the authors' code scales per sample over all channels together and upsamples
    with ``align_corners=True``; pytorch-grad-cam (followed here) scales per channel. It sees
    only ``Conv2d``/``BatchNorm2d`` modules with a ``bias`` parameter (so not a BatchNorm with
    ``affine=False``, whose shift ``-mean / sqrt(var + eps)`` is a bias here), and pairs biases
    with gradients by order, which goes wrong when a block's forward order differs from its
    modules' registration order. FullGrad has no target layer: ``layer`` must be None.
    """

    family = "cam"

    signed = False
    needs_smooth_activations = True

    def __init__(self, model: nn.Module, layer: str | None = None,
                 batch_size: int | None = None, channels_last: bool | None = None,
                 normalize: bool = False):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        if layer is not None:
            raise InvalidInputError(
                "FullGrad uses the bias gradients of every layer and has no target layer; "
                "leave layer=None.")
        self.normalize = options.flag(normalize, "normalize")

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            return self._with_layout(x, lambda leaf: self._map(leaf, t))

        return self._batched(inputs, target, one)

    def _map(self, x: Tensor, target: Target) -> Tensor:
        if model_has_attention(self, x):  # a transformer: the operation view, biases placed

            collector: Any = _TokenBiasGradients(tuple(x.shape[2:]), x.shape[0])
            collector.start(x)
            trace: Any = OpTrace(self.model, x, collector.rule())
            places = "entries with a known place in the image"
            example = ("made by a call the operation view does not know, or not one per "
                       "position of a grid with the image's aspect ratio")
        else:
            collector = _BiasGradientRule(x.dim(), x.shape[0])
            trace = Trace(self.model, x, collector)
            places = "a feature map shaped like the input (N, C, H, W)"
            example = "e.g. patches folded into the batch"
        with self._guard(), torch.enable_grad(), trace:
            out = trace.forward()
            if collector.unmapped:
                raise InvalidInputError(
                    f"FullGrad needs every bias to act on {places}; this model adds biases to "
                    f"tensors of shape {collector.unmapped[0]} ({example}), whose bias "
                    "gradients have no place in the image. Use a gradient or LRP method.")
            grad_out, _ = target_gradient(out, target)
            (gx,) = self._grad(out, x, grad_out)
            collector.closed = True
            del out
        return self._combine(x, gx, collector.maps)

    def _combine(self, x: Tensor, gx: Tensor, maps: dict[tuple[int, ...], Tensor]) -> Tensor:
        size = tuple(x.shape[2:])
        with torch.set_grad_enabled(is_differentiable()):
            cam = _minmax((gx * x).abs(), dims=2).sum(1)
            for summed in maps.values():  # each size's sum, upsampled once (linear)
                cam = cam + _upsample(summed, size)
            if self.normalize:
                cam = _minmax(cam)
        return keep_graph(cam).contiguous()
