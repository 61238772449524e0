"""GAE, the Global Attribution Evaluation of RAMP / absLRP (Vukadin et al., ACM TIST 2024).

GAE scores one "positive" image out of every group of four: ``GAE = LC * C``, where the local
consistency LC combines faithfulness and robustness measured against input-x-gradient masking
sequences of the positive image, and the contrastiveness C asks whether the map of a 2x2 mosaic
of the four images falls on the positive tile. Definitions follow the official code
(github davor10105/relative-absolute-magnitude-propagation, ``abslrp_gae/gae/gae.py``); see
docs/metrics.md for the formulas and the fixes below.

Fix of the reference's mosaic/label misalignment: the reference builds mosaic k from images
{k, m+k, 2m+k, 3m+k} (``torch.split`` into four chunks of m = B/4) but samples the positive and
reads the tile labels as if mosaic k held images {4k, ..., 4k+3}; for any batch size other than
4 the positive is not in its mosaic and the score tiles refer to other images. Here a group is
always the four consecutive images 4k..4k+3, used for the mosaic, the positive sampling and the
score tiles alike (tile order: top-left, top-right, bottom-left, bottom-right).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, InvalidTargetError
from .common import (
    Explain,
    check_explain,
    check_finite_logits,
    check_finite_number,
    check_inputs,
    check_model,
    check_positive_int,
    check_targets,
    chunks,
    concat_in_chunks,
    default_batch_size,
    explain_checked,
    guarded,
    to_tensor,
)
from .registry import register_metric
from .sampling import Sampling, SamplingOptions, sampling_of

Tensor = torch.Tensor

__all__ = ["GAEResult", "gae", "make_mosaics"]

EPS = 1e-9  # the reference's stabiliser, kept wherever it divides


@dataclass(frozen=True)
class GAEResult:
    """GAE per group of four images (M = N / 4 groups), with its parts.

    Attributes:
        gae: (M,) ``local_consistency * contrastiveness`` in [0, 1]; higher is better.
        local_consistency: (M,) ``relu(faithfulness + robustness) / 2`` in [0, 1].
        faithfulness: (M,) agreement with the combined impact map, in [-1, 1].
        robustness: (M,) agreement of map changes with output changes, in [-1, 1].
        contrastiveness: (M,) positive-tile share of the mosaic map, in [0, 1].
        positive_indices: (M,) index into ``x`` of each group's positive image.
        positive_tiles: (M,) its tile 0..3 (the random draw; pass it back as ``draws=``).
    """

    gae: Tensor
    local_consistency: Tensor
    faithfulness: Tensor
    robustness: Tensor
    contrastiveness: Tensor
    positive_indices: Tensor
    positive_tiles: Tensor


def make_mosaics(images: Tensor) -> Tensor:
    """(4M, C, h, w) -> (M, C, 2h, 2w): group k = images 4k..4k+3 as [[0, 1], [2, 3]]."""
    m = images.shape[0] // 4
    tiles = images.reshape(m, 4, *images.shape[1:])
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def _positive_map(maps: Tensor) -> Tensor:
    """The reference's ``maxnorm(relu(r))`` per sample; pixel maps become (N, 1, H, W)."""
    if maps.dim() == 3:
        maps = maps[:, None]
    r = maps.clamp_min(0)
    return r / (r.flatten(1).amax(1).view(-1, 1, 1, 1) + EPS)


def _overlap(r: Tensor, score_map: Tensor) -> Tensor:
    """``sum(r * S) / sum(r)``, with r broadcast over channels if it is a pixel map."""
    r = r.expand(-1, score_map.shape[1], -1, -1) if r.shape[1] == 1 else r
    return (r * score_map).flatten(1).sum(1) / (r.flatten(1).sum(1) + EPS)


def _dice(a: Tensor, b: Tensor) -> Tensor:
    """The reference's normalised L1 distance ``sum|a-b| / (sum|a| + sum|b|)``, per row."""
    a, b = a.flatten(1), b.flatten(1)
    return (a - b).abs().sum(1) / (a.abs().sum(1) + b.abs().sum(1) + EPS)


def _outputs(model: nn.Module, x: Tensor, size: int, what: str) -> Tensor:
    with torch.no_grad():
        return concat_in_chunks(
            x.shape[0], size,
            lambda s, e: check_finite_logits(model(x[s:e]), what, torch.arange(s, e)), "gae")


def _masking_sequences(model: nn.Module, x: Tensor, targets: Tensor, steps: int,
                       mask_value: float, softmax: bool):
    """MoRF and LeRF input-x-gradient masking of the positives (RAMP's stepwise masking).

    Rows 0..c-1 of every tensor are MoRF, rows c..2c-1 LeRF. At each of ``steps`` fractions
    p = 0.1, ..., 1: score the current input, take ``g = N1(|x * grad|)``, store (x, score, g),
    then (for p < 1) set the ``int(p * C*H*W)`` elements of largest (MoRF) or smallest (LeRF)
    g to ``mask_value``. Already masked elements have g = 0 (for mask_value 0), so LeRF masks
    10 %, 20 %, ... cumulatively while MoRF adds p new elements per step, as in the reference.
    """
    c = x.shape[0]
    current = torch.cat([x, x]).detach()
    both_targets = torch.cat([targets, targets])
    fractions = torch.linspace(1 / steps, 1, steps)  # float32, as the reference
    n_elements = x[0].numel()
    inputs, scores, impact_sum = [], [], torch.zeros_like(current, dtype=torch.float64)
    for p in fractions:
        with torch.enable_grad():
            leaf = current.detach().requires_grad_(True)
            out = check_finite_logits(model(leaf), "gae (masked copies of the positives; "
                                      "samples are counted within the chunk)")
            if softmax:
                out = out.softmax(1)
            selected = out.gather(1, both_targets[:, None])[:, 0]
            (grad,) = torch.autograd.grad(selected.sum(), leaf)
        impact = (leaf.detach() * grad).abs().to(torch.float64)
        impact = impact / (impact.flatten(1).sum(1).view(-1, 1, 1, 1) + EPS)
        inputs.append(current)
        scores.append(selected.detach().to(torch.float64))
        impact_sum += impact
        if p < 1.0:
            k = int(p * n_elements)
            flat_impact = impact.flatten(1)
            morf = flat_impact[:c].topk(k, dim=1, largest=True).indices
            lerf = flat_impact[c:].topk(k, dim=1, largest=False).indices
            masked = current.flatten(1).clone()
            masked.scatter_(1, torch.cat([morf, lerf]), mask_value)
            current = masked.view_as(current)
    return inputs, torch.stack(scores, 1), impact_sum


@register_metric(family="faithfulness", direction="higher", needs=("model", "explain"),
                 returns="GAEResult (one score per group of four images)",
                 rows=("gae", "local_consistency", "contrastiveness"))
def gae(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    num_masking_steps: int = 10,
    mask_value: float = 0.0,
    softmax: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> GAEResult:
    """Global Attribution Evaluation (RAMP/absLRP) of the method ``explain``.

    ``x`` holds N = 4M images, taken as M groups of four consecutive images (shuffle the data
    beforehand, as the reference's DataLoader does). Per group:

    1. Mosaic: the four images downsampled (nearest) to half size and tiled 2x2.
    2. Positive: tile j drawn with probability softmax_j(mosaic logit of tile j's predicted
       class); its predicted class is the explained target.
    3. Masking sequences: MoRF and LeRF input-x-gradient masking of the positive
       (``num_masking_steps`` steps, masked elements set to ``mask_value``, 0 = the mean colour
       of a normalised input); the combined impact map is
       ``CIM = sign(N1(sum_s g_LeRF) - N1(sum_s g_MoRF))``.
    4. With ``r = maxnorm(relu(explain(positive)))``: faithfulness
       ``F = sum(r * CIM) / sum(r)``; robustness ``Rb = 1 - 2 D(dr, do)`` over steps 1..S-1,
       with ``dr_s = D(r, r_MoRF,s) - D(r, r_LeRF,s)``, ``do_s = (o_LeRF,s - o_MoRF,s) / o_0``,
       ``D(a, b) = sum|a-b| / (sum|a| + sum|b|)``; ``LC = relu(F + Rb) / 2``.
    5. Contrastiveness ``C = relu(sum(r_mosaic * S) / sum(r_mosaic))``, where each tile of S is
       ``2 p(y_tile | positive) / p(y_positive | positive) - 1`` (softmax of the positive image,
       ``y`` = the dataset labels) and the 2x2 centre block is 1.

    Per method and group: 2 + 2 (S - 1) explain calls, batched over groups (chunks of
    ``batch_size`` images); the masking sequences cost S forward+backward passes of 2 images per
    group and do not depend on the method.

    Args:
        y: the dataset labels (the score tiles use them, as the reference); None uses the
            predicted classes.
        attributions: not used: GAE explains the positive images, the mosaics and the masked
            inputs itself with ``explain``. Accepted for the common signature.
        explain: the method under evaluation, ``explain(model, x, targets) -> maps``.
        num_masking_steps: S, the masking fractions ``linspace(1/S, 1, S)``.
        mask_value: the value masked elements get.
        softmax: use probabilities instead of logits for the masking gradients and o_s.
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`;
            its fields may be given as keywords instead). The seed draws the positive tiles;
            ``draws``: explicit positive tiles (M,) in 0..3 (e.g. ``result.positive_tiles``);
            ``batch_size``: images per forward or explain call; the bar counts groups.
    """
    sampling = sampling_of(sampling, options, "gae")
    draws = sampling.draws
    model = check_model(model)
    explain = check_explain(explain, "gae")
    steps = check_positive_int(num_masking_steps, "num_masking_steps", 2)
    mask_value = check_finite_number(mask_value, "mask_value")
    with guarded(model):
        x = check_inputs(x, model)
        n = x.shape[0]
        if n % 4:
            raise InvalidInputError(
                f"gae scores groups of four images: x must hold a multiple of 4 samples, got {n}.")
        m = n // 4
        _, _, height, width = x.shape
        if height < 4 or width < 4:
            raise InvalidInputError(f"gae needs images of at least 4x4 pixels, got {height}x"
                                    f"{width}.")
        size = default_batch_size(x, sampling.batch_size, explain=True, model=model)
        logits = _outputs(model, x, size, "gae")
        predicted = logits.argmax(1)
        labels = check_targets(y, n, x.device)
        if labels is None:
            labels = predicted
        if (labels >= logits.shape[1]).any():
            raise InvalidTargetError(f"y holds classes >= the model's {logits.shape[1]} outputs.")

        mosaics = make_mosaics(F.interpolate(x, size=(height // 2, width // 2)))
        mosaic_logits = _outputs(model, mosaics, size, "gae (the mosaics: samples are groups)")
        tile_classes = predicted.view(m, 4)
        tile_weights = mosaic_logits.gather(1, tile_classes).to(torch.float64).softmax(1)
        if draws is None:
            tiles = torch.multinomial(tile_weights.cpu(), 1,
                                      generator=sampling.make_generator())[:, 0]
        else:
            tiles = to_tensor(draws, "draws").reshape(-1).to(torch.long).cpu()
            if tiles.numel() != m or tiles.min() < 0 or tiles.max() > 3:
                raise InvalidInputError(f"draws must be {m} positive tiles in 0..3.")
        tiles = tiles.to(x.device)
        positives = torch.arange(m, device=x.device) * 4 + tiles
        positive_x, positive_y = x[positives], predicted[positives]

        # The score map: each tile's label probability under the positive image, relative to
        # the positive's own label; 2x2 centre block set to 1 (the reference's tie-break).
        probabilities = logits[positives].to(torch.float64).softmax(1)
        tile_probabilities = probabilities.gather(1, labels.view(m, 4))
        own = tile_probabilities.gather(1, tiles[:, None])
        tile_scores = 2 * tile_probabilities / own - 1
        half_h, half_w = height // 2, width // 2
        score_tiles = tile_scores.reshape(m * 4, 1, 1, 1).expand(m * 4, 1, half_h, half_w)
        score_maps = make_mosaics(score_tiles).clone()
        mh, mw = score_maps.shape[-2:]
        score_maps[:, :, mh // 2 - 1:mh // 2 + 1, mw // 2 - 1:mw // 2 + 1] = 1.0

        parts: dict[str, list[Tensor]] = {k: [] for k in (
            "faithfulness", "robustness", "contrastiveness")}
        groups_per_chunk = max(1, size // 2)
        for start, stop in chunks(m, groups_per_chunk, sampling.progress, "gae"):
            px, py = positive_x[start:stop], positive_y[start:stop]
            c = stop - start
            inputs, scores, impact_sum = _masking_sequences(model, px, py, steps, mask_value,
                                                            softmax)
            morf_sum, lerf_sum = impact_sum[:c], impact_sum[c:]
            combined_impact = torch.sign(
                lerf_sum / (lerf_sum.flatten(1).abs().sum(1).view(-1, 1, 1, 1) + EPS)
                - morf_sum / (morf_sum.flatten(1).abs().sum(1).view(-1, 1, 1, 1) + EPS))

            r = _positive_map(explain_checked(explain, model, px, py, None))
            # Maps of the masked inputs of steps 1..S-1, both orders, in explain chunks.
            masked = torch.cat(inputs[1:])  # ((S-1) * 2c, C, H, W), step-major
            masked_targets = torch.cat([py, py]).repeat(steps - 1)
            masked_maps = concat_in_chunks(
                masked.shape[0], size, lambda s, e, xs=masked, ts=masked_targets: _positive_map(
                    explain_checked(explain, model, xs[s:e], ts[s:e], None)), "gae")
            masked_maps = masked_maps.view(steps - 1, 2, c, *masked_maps.shape[1:])
            r_rows = r.flatten(1)
            map_change = torch.stack([
                _dice(r_rows, masked_maps[s, 0]) - _dice(r_rows, masked_maps[s, 1])
                for s in range(steps - 1)], 1)
            initial = scores[:c, 0:1]
            output_change = scores[c:, 1:] / (initial + EPS) - scores[:c, 1:] / (initial + EPS)

            parts["faithfulness"].append(_overlap(r.to(torch.float64), combined_impact))
            parts["robustness"].append(1 - 2 * _dice(map_change, output_change))

            mosaic_r = _positive_map(explain_checked(explain, model, mosaics[start:stop], py,
                                                     None))
            overlap = _overlap(mosaic_r.to(torch.float64), score_maps[start:stop])
            parts["contrastiveness"].append(overlap.clamp_min(0))

        faithfulness = torch.cat(parts["faithfulness"])
        robustness = torch.cat(parts["robustness"])
        contrastiveness = torch.cat(parts["contrastiveness"])
        local_consistency = (faithfulness + robustness).clamp_min(0) / 2
        return GAEResult(
            gae=local_consistency * contrastiveness,
            local_consistency=local_consistency,
            faithfulness=faithfulness,
            robustness=robustness,
            contrastiveness=contrastiveness,
            positive_indices=positives,
            positive_tiles=tiles,
        )
