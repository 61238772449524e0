"""SRD on token vectors: sharing ratio decomposition for Vision Transformers.

Each token's hidden vector is a pointwise feature vector (PFV), as each spatial position's
channel vector is in a CNN (``docs/srd.md``). Relevance is one number per PFV and flows by
sharing ratios, the projection of each source's contribution on the output vector::

    mu_{s -> t} = <c_{s -> t} (+ its bias share), z(t)> / ||z(t)||^2,   R(s) = sum_t mu R(t)

What that means for each call of a ViT (the operation-level tracer, ``engine/optrace.py``):

* **per-token calls** (dense layers, LayerNorm, activations, scalings, adding a parameter such
  as the position embedding): one source per output vector, so ``mu = 1`` (its bias share goes
  to it too) and the token keeps its relevance. Activations are transparent, as in SRD.
* **residual sums** ``z = a + b``: two sources per token, ``mu_a = <a, z> / ||z||^2`` and
  ``mu_b = <b, z> / ||z||^2`` (they sum to 1).
* **attention** ``o = A @ v``: the attention weights are the (input-dependent) mixing kernel and
  the value vectors the sources, like a convolution whose weights depend on the image:
  ``c_{s -> t} = A(t, s) v(s)`` per head, each head's output vector being a PFV. The weights
  themselves are not PFVs, so ``q @ k^T`` and the softmax pass no relevance: queries and keys
  get none (as in CP-LRP). SRD has no definition for relevance *through* the attention
  weights; this is the choice made here.
* **patch embedding** (a convolution with stride = kernel, no padding): every pixel's RGB vector
  is a source of one token, ``c_p = W_k x(p)``; the bias is split over the patch's pixels by the
  norms of their contributions (SRD's bias share), so the map is pixel-level.
* **class-token pooling** ``x[:, 0]`` and the head: the head is a per-token dense layer, so the
  class token of the last layer starts with the logit. A token-average head (``x.mean(1)``)
  shares it by ``mu_t = <x(t) / T, z> / ||z||^2``.

The class token's own relevance at the embedding (it is a parameter, not derived from pixels)
is dropped, so the map sums to the logit minus that share. Convolutions other than patch
embeddings, BatchNorm and pooling over space raise ``UnsupportedOperationError``: use ``srd``
for CNNs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..engine.core import Target, keep_graph
from ..engine.optrace import OpCall, OpRule
from ..errors import UnsupportedOperationError
from .base import Method, register

Tensor = torch.Tensor


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (an all-zero output vector has no sources)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


def _spread(per_vector: Tensor, like: Tensor) -> Tensor:
    """One relevance per vector (over the last dim of ``like``) laid out over its entries."""
    return (per_vector / like.shape[-1]).unsqueeze(-1).expand(like.shape).contiguous()


class SRDTokenRule(OpRule):
    """Sharing ratios between token vectors (see the module docstring); the backward signal
    is the relevance, whose sum over a vector's entries is that vector's relevance."""

    kinds = frozenset({"conv", "linear", "matmul", "layer_norm", "activation", "softmax",
                       "add", "sub", "mul", "div", "avg_pool", "scale", "batch_norm",
                       "max_pool"})

    def _unsupported(self, call: OpCall, why: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"srd_tokens cannot decompose {why} (call {call}). It explains Vision Transformers "
            "(token vectors); use method='srd' for CNNs.")

    def op_backward(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
                    grad: Tensor) -> list[Tensor | None]:
        kind, x = call.kind, inputs[0]
        if kind == "softmax":  # attention weights are not PFVs
            return [torch.zeros_like(x)]
        if kind == "conv":
            return [self._patch_embedding(call, x, output, grad)]
        if kind in ("batch_norm", "max_pool"):
            raise self._unsupported(call, f"'{kind}'")
        if kind == "avg_pool":
            return [self._token_mean(call, x, output, grad)]
        if len(inputs) == 2:
            if kind in ("add", "sub"):
                return self._residual(call, inputs, output, grad)
            if kind == "matmul":
                return self._attention(inputs, output, grad)
            raise self._unsupported(call, f"'{kind}' of two activations")
        if kind in ("linear", "layer_norm", "matmul"):  # per-token: mu = 1
            return [_spread(grad.sum(-1), x)]
        if x.shape == grad.shape:  # elementwise: activations, scalings, + a parameter
            return [grad]
        raise self._unsupported(call, f"'{kind}' changing the shape {tuple(x.shape)} -> "
                                      f"{tuple(grad.shape)}")

    @staticmethod
    def _residual(call: OpCall, inputs: Sequence[Tensor], z: Tensor, r: Tensor) -> list[Tensor]:
        a, b = inputs
        if call.kind == "sub":
            b = -b
        if a.shape != z.shape or b.shape != z.shape:
            a, b = a.expand(z.shape), b.expand(z.shape)
        norm2 = (z * z).sum(-1)
        total = r.sum(-1)
        ra = _spread(_ratio((a * z).sum(-1), norm2) * total, z)
        rb = _spread(_ratio((b * z).sum(-1), norm2) * total, z)
        return [_reduce_to(ra, inputs[0]), _reduce_to(rb, inputs[1])]

    @staticmethod
    def _attention(inputs: Sequence[Tensor], o: Tensor, r: Tensor) -> list[Tensor]:
        a, v = inputs  # o = a @ v: a mixes the rows of v
        if not bool(r.any()):  # q @ k^T: nothing comes back through the softmax
            return [torch.zeros_like(a), torch.zeros_like(v)]
        per_out = r.sum(-1)  # (..., T): one relevance per (head, token) output vector
        mu = _ratio(a * (o @ v.mT), (o * o).sum(-1, keepdim=True))  # (..., T, S)
        per_source = (mu * per_out.unsqueeze(-1)).sum(-2)  # (..., S)
        return [torch.zeros_like(a), _spread(per_source, v)]

    def _token_mean(self, call: OpCall, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
        dim = call.argument(1, "dim")
        if x.dim() != 3 or dim not in (1, -2, (1,), [1]):
            raise self._unsupported(call, "averaging other than over the tokens of (N, T, D)")
        tokens = x.shape[1]
        mu = _ratio((x * z.unsqueeze(1)).sum(-1) / tokens, (z * z).sum(-1, keepdim=True))
        return _spread(mu * r.sum(-1, keepdim=True), x)

    def _patch_embedding(self, call: OpCall, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
        weight, bias = call.args[1], call.argument(2, "bias")
        stride, padding = call.argument(3, "stride", 1), call.argument(4, "padding", 0)
        dilation, groups = call.argument(5, "dilation", 1), call.argument(6, "groups", 1)
        k = tuple(weight.shape[2:])

        def pair(v):
            return tuple(v) if isinstance(v, list | tuple) else (v,) * len(k)

        if (x.dim() != 4 or not isinstance(weight, Tensor) or pair(stride) != k
                or pair(padding) != (0, 0) or pair(dilation) != (1, 1) or groups != 1
                or x.shape[2] % k[0] or x.shape[3] % k[1]):
            raise self._unsupported(call, "a convolution other than a patch embedding "
                                          "(stride = kernel, no padding, no dilation, groups 1)")
        n, c, h, w = x.shape
        ph, pw = h // k[0], w // k[1]
        norm2 = (z * z).sum(1)  # (N, ph, pw)
        per_token = r.sum(1)
        # <W_k x(p), z(t)> for every pixel, summed over its channels
        direct = (F.conv_transpose2d(z, weight, stride=k) * x).sum(1)  # (N, H, W)
        # ||W_k x(p)|| from each offset's Gram matrix W_k^T W_k (C x C)
        gram = torch.einsum("dcij,deij->ijce", weight, weight)
        patches = x.reshape(n, c, ph, k[0], pw, k[1]).permute(0, 2, 4, 3, 5, 1)
        norms = torch.einsum("nabijc,ijce,nabije->nabij", patches, gram, patches).clamp(min=0)
        norms = norms.sqrt()  # (N, ph, pw, kh, kw)
        if bias is not None:
            bias_proj = (bias.reshape(1, -1, 1, 1) * z).sum(1)  # <b, z(t)>
            share = _ratio(norms, norms.sum((-2, -1), keepdim=True))
            bias_part = share * bias_proj[..., None, None]
            bias_part = bias_part.permute(0, 1, 3, 2, 4).reshape(n, h, w)
            direct = direct + bias_part
        mu = _ratio(direct, _tile(norm2, k))
        pixel = mu * _tile(per_token, k)
        return (pixel / c).unsqueeze(1).expand(n, c, h, w).contiguous()


def _tile(per_token: Tensor, k: tuple[int, ...]) -> Tensor:
    """(N, ph, pw) -> (N, H, W): each token's value over its patch."""
    return per_token.repeat_interleave(k[0], 1).repeat_interleave(k[1], 2)


def _reduce_to(r: Tensor, like: Tensor) -> Tensor:
    """Sum a relevance over the dimensions ``like`` was broadcast along."""
    if r.shape == like.shape:
        return r
    dims = [i for i, (a, b) in enumerate(zip(r.shape[-like.dim():], like.shape, strict=True))
            if b == 1 and a != 1]
    lead = r.dim() - like.dim()
    out = r.sum(tuple(range(lead))) if lead else r
    return out.sum(tuple(dims), keepdim=True) if dims else out


@register("srd_tokens")
class SRDTokens(Method):
    """SRD for Vision Transformers: token vectors as PFVs, sharing ratios at residual sums,
    attention (values as sources, attention weights as the mixing kernel) and the patch
    embedding (pixel sources with SRD's bias share). Signed; pixel-level (N, H, W); sums to the
    target logit minus the class token's share at the embedding. See the module docstring for
    what is and is not defined for attention."""

    signed = True

    def relevance(self, x: Tensor, target: Target) -> Tensor:
        """Input relevance ``(N, C, H, W)`` (each pixel's relevance spread over its channels)."""

        def run(leaf: Tensor) -> Tensor:
            (rel,) = self._traced_gradients(
                leaf, SRDTokenRule(),
                lambda out: [self._target_gradient(out, target)[0] * keep_graph(out)])
            return rel.contiguous()

        return self._with_layout(x, run)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self._batched(inputs, target, lambda x, t: self.relevance(x, t).sum(1))
