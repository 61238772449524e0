"""Self-checks of the hybrid-SRD oracle (tests/srd_hybrid_oracle.py), independent of srdxai's
implementation: its forward equals the model's own (every stage, every activation), every cut
through the network carries exactly the target logit (SiLU and ReLU, several seeds and targets),
batches are per sample, the convolution and residual rules give hand-derived numbers (padding,
stride, bias split by norms, depthwise groups), the loop code agrees with a vectorized
(unfold / fold) form of the convolution rule, and plausible misreadings of the definition, which
all conserve the logit too, change the map by far more than 1e-3. With the squeeze-excitation
gate (``se=True``): the forward (gate value included) equals the model's, every cut carries the
logit, the gate passes each position's relevance unchanged to its signal vector (by hand), and
the gate branch acts on the map only through the gate's forward value (its vectors get nothing,
other weights with the same gate value give the same map, and the map equals that of the model
without the gate whose projecting convolution has the gate folded into its weight). With the
global-context block (``gc=True``): the forward (softmax weights, context and ``m`` included)
equals the model's, every cut carries the logit, the block's input gets what its output had,
the attention pooling and the broadcast add give hand-derived numbers, the loop code agrees with
a vectorized form fed by the model's own tensors, a block with ``m = 0`` is transparent, and
deliberately wrong rules (the softmax weights get relevance; ``m``'s share dropped) break
conservation by exactly what they withhold. With the ECA gate (``eca=True``), the max pooling of
the map (``max_pool=True``) and the token max pooling (``token_max=True``), alone and combined
with each other and the older blocks: the model's forward equals a plain torch computation of
the same operations and the oracle's recomputation equals both, every cut carries the logit, the
max-pooling rule gives hand-derived numbers (winners per channel, padding never a winner,
overlapping windows summed, a tie to torch's index), as does the token max pooling (a tie split
half and half, as torch's ``amax`` gradient) and the ECA gate (its value from the Conv1d along
the channels, the relevance passed unchanged), the loop code agrees with an autograd form of
the max rule fed by the model's own tensors, and wrong rules (routing by ``|x|``, an even split,
half left on the gate) fail the hand examples or conservation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srd_hybrid_oracle as ora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)

DT = torch.float64


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=DT)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _outputs(model: torch.nn.Module, x: torch.Tensor,
             modules: dict[str, torch.nn.Module]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's logits on ``x`` and the outputs of ``modules`` (by name), from hooks."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
             for k, mod in modules.items()]
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for h in hooks:
            h.remove()
    return ref, seen


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("activation", ["silu", "relu", "gelu", "elu", "leaky_relu", "tanh"])
def test_forward_reproduces_model(activation: str) -> None:
    """Stem conv output, inverted-residual output, transformer output and logits equal the
    model's own forward (hooks) to 1e-12."""
    model = ora.tiny_hybrid(activation, seed=2)
    x = ora.tiny_hybrid_input(seed=3)
    ref, seen = _outputs(model, x, {"stem": model.stem_conv, "ir": model.ir,
                                    "tokens": model.blocks})
    trace = ora.srd_hybrid_oracle_trace(model, x, 0)
    for n, s in enumerate(trace):
        assert torch.allclose(s["logits"], ref[n], rtol=1e-12, atol=1e-12)
        for k in ("stem", "ir", "tokens"):
            assert torch.allclose(s["forward"][k], seen[k][n], rtol=1e-12, atol=1e-12), k
    assert torch.allclose(ora.oracle_logits(model, x), ref, rtol=1e-12, atol=1e-12)


def test_builder_is_non_trivial() -> None:
    """Biases, BN statistics and gains are at scales where a wrong rule shows."""
    model = ora.tiny_hybrid("silu", seed=0)
    assert next(model.parameters()).dtype == DT and not model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4
    for bn in bns:
        assert bool(((bn.running_var >= 0.5) & (bn.running_var <= 2.0)).all())
        assert float(bn.running_mean.abs().max()) > 0.1
        assert float(bn.bias.detach().abs().max()) > 0.1
    assert any(bool((bn.weight < 0).any()) for bn in bns)
    for conv in (model.stem_conv, model.ir.expand, model.ir.dw, model.ir.project):
        assert float(conv.bias.detach().abs().max()) > 0.1
    assert model.ir.dw.groups == 16 and model.stem_conv.stride == (2, 2)
    assert ora.tiny_hybrid_input(0).shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------- conservation

CUTS = ["tokens_out", "tokens_in", "sum", "branch+shortcut", "dw_out+shortcut",
        "dw_in+shortcut", "ir_in", "stem_out", "pixel"]


def _cut(s: dict, name: str) -> float:
    return sum(float(torch.as_tensor(s[k], dtype=DT).sum()) for k in name.split("+"))


@pytest.mark.parametrize("activation", ["silu", "relu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conservation(activation: str, seed: int) -> None:
    """The pixel map, and every cut through the network, sums to the target logit per sample;
    nothing is lost."""
    model = ora.tiny_hybrid(activation, seed=seed)
    x = ora.tiny_hybrid_input(seed=seed + 10)
    with torch.no_grad():
        logits = model(x)
    for target in (0, 3):
        trace = ora.srd_hybrid_oracle_trace(model, x, target)
        for n, s in enumerate(trace):
            want = float(logits[n, target])
            assert s["pixel"].shape == (16, 16) and s["pixel"].dtype == DT
            assert s["lost"] <= 1e-12 * max(abs(want), 1.0)
            for cut in CUTS:
                got = _cut(s, cut)
                assert abs(got - want) <= 1e-9 * max(abs(want), 1e-3), (cut, got, want)


def test_batch_is_per_sample() -> None:
    model = ora.tiny_hybrid("silu", seed=6)
    x = ora.tiny_hybrid_input(seed=7, n=3)
    full = ora.srd_hybrid_oracle(model, x, 1)
    assert full.shape == (3, 16, 16) and full.dtype == DT
    for n in range(3):
        assert torch.equal(full[n], ora.srd_hybrid_oracle(model, x[n:n + 1], 1)[0])


# --------------------------------------------------------------------------- rules by hand


def _conv(c_in: int, c_out: int, groups: int = 1, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups).to(DT)


def _padded_bias_conv() -> tuple[nn.Conv2d, torch.Tensor]:
    conv = _conv(1, 2)
    with torch.no_grad():
        conv.weight.fill_(9.0)  # every offset that reads padding at output (0, 0)
        conv.weight[:, 0, 1, 1] = _t(3, 0)
        conv.weight[:, 0, 1, 2] = _t(0, 2)
        conv.weight[:, 0, 2, 1] = _t(5, -5)
        conv.weight[:, 0, 2, 2] = _t(-1, 0)
        conv.bias.copy_(_t(8, 8))
    return conv, _t(1, 2, 0, 1).view(1, 2, 2)


def test_conv_bias_split_by_norms_with_padding_by_hand() -> None:
    """Conv2d(1, 2, 3, padding=1), bias b = (8, 8), on the 2 x 2 image x = [[1, 2], [0, 1]].

    Output (0, 0) reads offsets (1, 1) (1, 2) (2, 1) (2, 2) at pixels (0, 0) (0, 1) (1, 0) (1, 1);
    its five other offsets (weight 9) read zero padding: not sources, no bias share.
    W_(1,1) = (3, 0), W_(1,2) = (0, 2), W_(2,1) = (5, -5), W_(2,2) = (-1, 0), so
    c_00 = (3, 0), c_01 = 2 (0, 2) = (0, 4), c_10 = 0 (x = 0), c_11 = (-1, 0).
    Norms 3, 4, 0, 1 (sum 8): beta = (3, 3), (4, 4), (0, 0), (1, 1).
    y = (3, 0) + (0, 4) + (-1, 0) + (8, 8) = (10, 12), ||y||^2 = 244.
    mu_00 = <(6, 3), y>/244 = 96/244 = 24/61; mu_01 = <(4, 8), y>/244 = 136/244 = 34/61;
    mu_10 = <(0, 0), y>/244 = 0; mu_11 = <(0, 1), y>/244 = 12/244 = 3/61 (sum 1).
    Misreading (bias split evenly over the 4 sources, beta = (2, 2) each):
    mu = <(5, 2), y>, <(2, 6), y>, <(2, 2), y>, <(1, 2), y> over 244
       = 74, 92, 44, 34 over 244 = 37/122, 23/61, 11/61, 17/122.
    """
    conv, x = _padded_bias_conv()
    with torch.no_grad():
        assert torch.allclose(conv(x[None])[0, :, 0, 0], _t(10, 12), atol=1e-14)
    got = ora.conv_shares(conv, x, 0, 0)
    assert [p for p, _ in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [m for _, m in got] == pytest.approx([24 / 61, 34 / 61, 0.0, 3 / 61], abs=1e-15)
    even = ora.conv_shares(conv, x, 0, 0, even=True)
    assert [m for _, m in even] == pytest.approx([37 / 122, 23 / 61, 11 / 61, 17 / 122],
                                                 abs=1e-15)


def test_conv_zero_window_splits_evenly_over_real_positions() -> None:
    """Conv2d(1, 2, 3, padding=1) with bias (1, -2) on a 2 x 2 zero image: every output is
    y = b (non-zero) and every window holds the same 4 pixels (norms all 0), so each pixel gets
    mu = 1/4 of every output (1/9 if the 5 padding offsets counted). R_out = [[1, 2], [3, 4]]:
    every pixel gets 10/4 = 2.5, the map sums to 10."""
    conv = _conv(1, 2)
    with torch.no_grad():
        conv.bias.copy_(_t(1, -2))
    x = torch.zeros(1, 2, 2, dtype=DT)
    r_in = ora.conv_relevance(conv, x, _t(1, 2, 3, 4).view(2, 2))
    assert torch.allclose(r_in, torch.full((2, 2), 2.5, dtype=DT), atol=1e-15)


def test_conv_stride_two_windows_by_hand() -> None:
    """Conv2d(1, 1, 3, stride=2, padding=1), all weights 1, bias 2, on a 4 x 4 image of ones
    (the stem's geometry). Output (i, j) reads rows/cols 2i-1 .. 2i+1 inside 0..3: windows
    W00 = {0,1}x{0,1} (4 pixels), W01 = {0,1}x{1,2,3} (6), W10 = {1,2,3}x{0,1} (6),
    W11 = {1,2,3}x{1,2,3} (9). All contributions are 1 (equal norms), so the bias splits evenly
    and mu = (1 + 2/k) / (k + 2) = 1/k for a window of k pixels. With R_out = 1 everywhere,
    R(p) = sum over the windows holding p of 1/k:
        row 0: 1/4, 1/4+1/6 = 5/12, 1/6, 1/6
        row 1: 5/12, 1/4+1/6+1/6+1/9 = 25/36, 1/6+1/9 = 5/18, 5/18
        rows 2, 3: 1/6, 5/18, 1/9, 1/9
    (row sums 1, 5/3, 2/3, 2/3: total 4 = 4 outputs x 1)."""
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1).to(DT)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(2.0)
    x = torch.ones(1, 4, 4, dtype=DT)
    got = ora.conv_shares(conv, x, 0, 1)
    assert [p for p, _ in got] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert [m for _, m in got] == pytest.approx([1 / 6] * 6, abs=1e-15)
    low = [1 / 6, 5 / 18, 1 / 9, 1 / 9]
    want = torch.tensor([[1 / 4, 5 / 12, 1 / 6, 1 / 6], [5 / 12, 25 / 36, 5 / 18, 5 / 18],
                         low, low], dtype=DT)
    r_in = ora.conv_relevance(conv, x, torch.ones(2, 2, dtype=DT))
    assert torch.allclose(r_in, want, atol=1e-15)


def test_depthwise_conv_by_hand() -> None:
    """Depthwise Conv2d(2, 2, 3, padding=1, groups=2), bias (17, 0), on the 1 x 2 image
    x(0, 0) = (3, 2), x(0, 1) = (0, 3); all weights 5 except W_(1,1) = diag(1, 2),
    W_(1,2) = diag(7, 4) (block-diagonal: channel k only sees channel k).
    Output (0, 0): sources (0, 0) at offset (1, 1) and (0, 1) at offset (1, 2) (the other seven
    offsets read padding). c_00 = (1*3, 2*2) = (3, 4), norm 5; c_01 = (7*0, 4*3) = (0, 12),
    norm 12. beta = 5/17 (17, 0) = (5, 0) and 12/17 (17, 0) = (12, 0).
    y = (20, 16), ||y||^2 = 656; mu_00 = <(8, 4), y>/656 = 224/656 = 14/41,
    mu_01 = <(12, 12), y>/656 = 432/656 = 27/41."""
    conv = _conv(2, 2, groups=2)
    with torch.no_grad():
        conv.weight.fill_(5.0)
        conv.weight[:, 0, 1, 1] = _t(1, 2)
        conv.weight[:, 0, 1, 2] = _t(7, 4)
        conv.bias.copy_(_t(17, 0))
    x = torch.tensor([[[3.0, 0.0]], [[2.0, 3.0]]], dtype=DT)
    with torch.no_grad():
        assert torch.allclose(conv(x[None])[0, :, 0, 0], _t(20, 16), atol=1e-14)
    got = ora.conv_shares(conv, x, 0, 0)
    assert [p for p, _ in got] == [(0, 0), (0, 1)]
    assert [m for _, m in got] == pytest.approx([14 / 41, 27 / 41], abs=1e-15)


def test_residual_nchw_by_hand() -> None:
    """y = a + b on a (C=2, H=1, W=2) map; the PFVs are the channel vectors per position.
    (0, 0): a = (1, 0), b = (1, 1), y = (2, 1): mu_a = 2/5, mu_b = 3/5.
    (0, 1): a = (0, 1), b = (2, 0), y = (2, 1): mu_a = 1/5, mu_b = 4/5.
    Misreading (vectors along W as if tokens, averaged over channels):
    channel 0: a = (1, 0), b = (1, 2), y = (2, 2): mu_a = 2/8; channel 1: a = (0, 1),
    b = (1, 0), y = (1, 1): mu_a = 1/2; mean mu_a = 3/8 at both positions."""
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=DT)
    b = torch.tensor([[[1.0, 2.0]], [[1.0, 0.0]]], dtype=DT)
    r = torch.ones(1, 2, dtype=DT)
    r_a, r_b = ora.residual_relevance(a, b, r)
    assert torch.allclose(r_a, _t(2 / 5, 1 / 5).view(1, 2), atol=1e-15)
    assert torch.allclose(r_b, _t(3 / 5, 4 / 5).view(1, 2), atol=1e-15)
    m_a, m_b = ora.residual_relevance(a, b, r, last_axis=True)
    assert torch.allclose(m_a, _t(3 / 8, 3 / 8).view(1, 2), atol=1e-15)
    assert torch.allclose(m_b, _t(5 / 8, 5 / 8).view(1, 2), atol=1e-15)


# --------------------------------------------------------------------------- vectorized form


def _vectorized_conv_relevance(conv: nn.Conv2d, x: torch.Tensor, r_out: torch.Tensor
                               ) -> torch.Tensor:
    """The convolution rule for a batch with unfold / fold, no loops over positions."""
    n, c_in, h, w = x.shape
    k = conv.kernel_size
    kk = k[0] * k[1]
    g = conv.groups
    args = dict(kernel_size=k, padding=conv.padding, stride=conv.stride)
    cols = F.unfold(x, **args)                                    # (N, C_in*K, L)
    cols = cols.view(n, g, c_in // g, kk, -1)
    wt = conv.weight.view(g, conv.out_channels // g, c_in // g, kk)
    c = torch.einsum("gock,ngckl->nklgo", wt, cols).flatten(-2)  # (N, K, L, C_out)
    real = F.unfold(torch.ones(1, 1, h, w, dtype=x.dtype), **args)[0] > 0  # (K, L)
    y = conv(x).flatten(2).transpose(1, 2)                        # (N, L, C_out)
    norms = c.norm(dim=-1)                                        # (N, K, L)
    total = norms.sum(1, keepdim=True)
    assert bool((total > 0).all())
    beta = conv.bias * (norms / total)[..., None]
    mu = ((c + beta) * y[:, None]).sum(-1) / (y * y).sum(-1)[:, None]
    mu = mu * real
    r = mu * r_out.flatten(1)[:, None]                            # (N, K, L)
    return F.fold(r, (h, w), **args)[:, 0]


def test_conv_loops_match_vectorized_form() -> None:
    """The stem conv (stride 2, padding 1, 3 -> 8 channels) and the depthwise conv (groups 16):
    given the relevance the oracle puts on their outputs, the relevance it puts on their
    inputs equals a vectorized form of the rule fed by the model's own tensors (hooks)."""
    model = ora.tiny_hybrid("silu", seed=4)
    x = ora.tiny_hybrid_input(seed=5)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.ir.dw.register_forward_hook(lambda m, i, o: seen.__setitem__("dw", i[0]))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hk in hooks:
            hk.remove()
    trace = ora.srd_hybrid_oracle_trace(model, x, 2)
    with torch.no_grad():
        px = _vectorized_conv_relevance(model.stem_conv, x,
                                        torch.stack([s["stem_out"] for s in trace]))
        dw = _vectorized_conv_relevance(model.ir.dw, seen["dw"],
                                        torch.stack([s["dw_out"] for s in trace]))
    assert torch.allclose(torch.stack([s["pixel"] for s in trace]), px, rtol=1e-10, atol=1e-13)
    assert torch.allclose(torch.stack([s["dw_in"] for s in trace]), dw, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- sensitivity


def _definition_and(misread: str, **blocks: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """On one SiLU hybrid (``blocks``: its optional blocks) and one input: the target logit,
    the oracle's map by the definition, and its map under ``misread``."""
    model = ora.tiny_hybrid("silu", seed=0, **blocks)
    x = ora.tiny_hybrid_input(seed=1, n=1)
    with torch.no_grad():
        logit = float(model(x)[0, 2])
    return (logit, ora.srd_hybrid_oracle(model, x, 2),
            ora.srd_hybrid_oracle(model, x, 2, misread=misread))


@pytest.mark.parametrize("misread", ora.MISREADINGS)
def test_misreadings_change_the_map(misread: str) -> None:
    """Each misreading conserves the logit just as well (so conservation tests cannot see it)
    but moves the map by more than 1e-3 relative: the oracle can tell them apart."""
    logit, ref, alt = _definition_and(misread)
    assert float(alt.sum()) == pytest.approx(logit, rel=1e-9)
    assert _rel(alt, ref) > 1e-3


def test_unknown_misreading_is_refused() -> None:
    model = ora.tiny_hybrid("relu", seed=0)
    with pytest.raises(ValueError):
        ora.srd_hybrid_oracle(model, ora.tiny_hybrid_input(0, n=1), 0, misread="nope")


# ------------------------------------------------------------------ squeeze-excitation gate


@pytest.mark.parametrize("activation", ["silu", "relu", "gelu"])
def test_forward_reproduces_model_with_se_gate(activation: str) -> None:
    """With the gate: the gate value, the gated map, the block output, the transformer output and
    the logits equal the model's own forward (hooks) to 1e-12."""
    model = ora.tiny_hybrid(activation, seed=2, se=True)
    x = ora.tiny_hybrid_input(seed=3)
    se = model.ir.se
    ref, seen = _outputs(model, x, {"stem": model.stem_conv, "ir": model.ir, "se": se,
                                    "gate": se.scale_activation, "tokens": model.blocks})
    assert seen["gate"].shape == (2, 16, 1, 1) and seen["se"].shape == (2, 16, 8, 8)
    trace = ora.srd_hybrid_oracle_trace(model, x, 0)
    for n, s in enumerate(trace):
        assert torch.allclose(s["logits"], ref[n], rtol=1e-12, atol=1e-12)
        assert torch.allclose(s["forward"]["gate"], seen["gate"][n, :, 0, 0], rtol=1e-12,
                              atol=1e-12)
        for k in ("stem", "ir", "se", "tokens"):
            assert torch.allclose(s["forward"][k], seen[k][n], rtol=1e-12, atol=1e-12), k
    assert torch.allclose(ora.oracle_logits(model, x), ref, rtol=1e-12, atol=1e-12)


def test_se_builder_is_non_trivial() -> None:
    """The gate sits between the depthwise activation and the projecting conv, its convs have
    biases at a scale that matters, and its value varies over channels; the default model has
    no gate."""
    assert ora.tiny_hybrid("silu", seed=0).ir.se is None
    model = ora.tiny_hybrid("silu", seed=0, se=True)
    se = model.ir.se
    assert isinstance(se, ora.SqueezeExcitation) and not model.training
    assert list(dict(model.ir.named_children())) == [
        "expand", "bn1", "act1", "dw", "bn2", "act2", "se", "project", "bn3"]
    assert se.fc1.weight.shape == (4, 16, 1, 1) and se.fc2.weight.shape == (16, 4, 1, 1)
    for fc in (se.fc1, se.fc2):
        assert fc.weight.dtype == DT and float(fc.bias.detach().abs().max()) > 0.1
    gate = ora.srd_hybrid_oracle_trace(model, ora.tiny_hybrid_input(0, n=1), 0)[0]["forward"][
        "gate"]
    assert float(gate.max() - gate.min()) > 0.2


SE_CUTS = [*CUTS, "gate_out+shortcut", "gate_signal+shortcut"]


@pytest.mark.parametrize("activation", ["silu", "relu", "gelu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_conservation_with_se_gate(activation: str, seed: int) -> None:
    """With the gate, the pixel map and every cut (also at the gated product and at its
    signal) sum to the target logit per sample; nothing is lost and the gate branch gets
    nothing."""
    for s in _traces_conserving(ora.tiny_hybrid(activation, seed=seed, se=True), seed,
                                SE_CUTS):
        assert set(s["gate_branch"]) == {"pooled", "fc1", "act", "fc2", "gate"}
        assert all(v == 0.0 for v in s["gate_branch"].values())


def _traces_conserving(model, seed: int, cuts) -> list[dict]:
    """The oracle's traces for targets 0 and 3 on the input of ``seed``, each checked: a
    float64 pixel map, nothing lost, and every cut in ``cuts`` summing to the target logit."""
    x = ora.tiny_hybrid_input(seed=seed + 10)
    with torch.no_grad():
        logits = model(x)
    traces = []
    for target in (0, 3):
        for n, s in enumerate(ora.srd_hybrid_oracle_trace(model, x, target)):
            want = float(logits[n, target])
            assert s["pixel"].shape == (16, 16) and s["pixel"].dtype == DT
            assert s["lost"] <= 1e-12 * max(abs(want), 1.0)
            for cut in cuts:
                got = _cut(s, cut)
                assert abs(got - want) <= 1e-9 * max(abs(want), 1e-3), (cut, got, want)
            traces.append(s)
    return traces


def test_gate_passes_relevance_unchanged_by_hand() -> None:
    """SqueezeExcitation(2 channels, 1 squeeze channel, ReLU) on the 1 x 3 signal
    s(0, 0) = (2, 1), s(0, 1) = (1, -4), s(0, 2) = (0, 0).
    Pool: (3, -3) / 3 = (1, -1); fc1 = [1, -1], bias 0: 2; ReLU: 2; fc2 = (0, ln(3)/2), bias 0:
    (0, ln 3); sigmoid: gate g = (1/2, 3/4).
    y(0, 0) = (1, 3/4), y(0, 1) = (1/2, -3), y(0, 2) = (0, 0).
    Each y(p) has the one source s(p) with contribution g ⊙ s(p) = y(p) (no bias), so
    mu = <y(p), y(p)> / ||y(p)||^2 = 1, and R(s(p)) = R(y(p)) also where y(p) = 0 (one source,
    nothing else to pass it to). R(y) = [5, -2, 7] gives R(s) = [5, -2, 7]; the gate gets none."""
    se = ora.SqueezeExcitation(2, 1, "relu").to(DT)
    with torch.no_grad():
        se.fc1.weight.copy_(_t(1, -1).view(1, 2, 1, 1))
        se.fc1.bias.zero_()
        se.fc2.weight.copy_(_t(0, math.log(3.0) / 2).view(2, 1, 1, 1))
        se.fc2.bias.zero_()
    s = torch.tensor([[[2.0, 1.0, 0.0]], [[1.0, -4.0, 0.0]]], dtype=DT)
    gate = ora.se_gate(se, s)
    assert torch.allclose(gate, _t(1 / 2, 3 / 4), atol=1e-15)
    with torch.no_grad():
        y = se(s[None])[0]
    assert torch.allclose(y, torch.tensor([[[1.0, 0.5, 0.0]], [[0.75, -3.0, 0.0]]],
                                          dtype=DT), atol=1e-15)
    r_s = ora.gate_relevance(s, gate, _t(5, -2, 7).view(1, 3))
    assert torch.allclose(r_s, _t(5, -2, 7).view(1, 3), rtol=1e-15, atol=0)


def test_gate_in_the_model_passes_each_position_unchanged() -> None:
    """In the full model the relevance at the gated product (project conv input) reaches the
    signal (depthwise activation output) position by position unchanged."""
    model = ora.tiny_hybrid("silu", seed=3, se=True)
    for s in ora.srd_hybrid_oracle_trace(model, ora.tiny_hybrid_input(seed=4), 2):
        assert float(s["gate_out"].abs().min()) > 0
        assert torch.allclose(s["gate_signal"], s["gate_out"], rtol=1e-14, atol=0)


def test_gate_branch_acts_only_through_the_gate_value() -> None:
    """ReLU inside the gate is positively homogeneous: fc1 (weight and bias) times 4 and fc2's
    weight over 4 give other branch weights with the same gate value, and the same map (1e-12);
    a changed gate value (fc2's bias) changes the map; the branch's vectors get nothing."""
    model = ora.tiny_hybrid("relu", seed=5, se=True)
    x = ora.tiny_hybrid_input(seed=6)
    ref = ora.srd_hybrid_oracle_trace(model, x, 1)
    se = model.ir.se
    with torch.no_grad():
        se.fc1.weight.mul_(4.0)
        se.fc1.bias.mul_(4.0)
        se.fc2.weight.div_(4.0)
    same = ora.srd_hybrid_oracle_trace(model, x, 1)
    for a, b in zip(ref, same, strict=True):
        assert torch.allclose(b["forward"]["gate"], a["forward"]["gate"], rtol=1e-13, atol=0)
        assert torch.allclose(b["pixel"], a["pixel"], rtol=1e-12, atol=1e-14)
        assert all(v == 0.0 for v in b["gate_branch"].values())
    with torch.no_grad():
        se.fc2.bias.add_(torch.linspace(-1.0, 1.0, 16, dtype=DT))
    moved = ora.srd_hybrid_oracle_trace(model, x, 1)
    for a, b in zip(ref, moved, strict=True):
        assert _rel(b["pixel"], a["pixel"]) > 1e-3


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_gate_is_a_constant_weight_folded_into_project(activation: str) -> None:
    """Per sample, the gate is a constant per-channel weight: the map of the gated model equals
    the map of the same model without the gate whose projecting 1x1 conv has the weight
    W diag(g) (g that sample's gate value): same project contributions, same ratios."""
    model = ora.tiny_hybrid(activation, seed=7, se=True)
    x = ora.tiny_hybrid_input(seed=8)
    trace = ora.srd_hybrid_oracle_trace(model, x, 4)
    for n, s in enumerate(trace):
        plain = ora.TinyHybrid(activation).to(DT).eval()
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        assert not missing and unexpected and all(".se." in k for k in unexpected)
        with torch.no_grad():
            plain.ir.project.weight.mul_(s["forward"]["gate"].view(1, 16, 1, 1))
            assert torch.allclose(plain(x[n:n + 1])[0], s["logits"], rtol=1e-12, atol=1e-12)
        folded = ora.srd_hybrid_oracle(plain, x[n:n + 1], 4)[0]
        assert torch.allclose(folded, s["pixel"], rtol=1e-10, atol=1e-12 * float(
            s["pixel"].abs().max()))


# ------------------------------------------------------------------ global-context block


def _gc_seen(model: torch.nn.Module, x: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's logits and, from hooks, the global-context block's input ``x`` and output
    ``gc``, the attention logits ``attn`` (conv_attn output), the ``context`` (conv1 input) and
    ``m`` (conv2 output), plus the transformer output ``tokens``."""
    gc = model.gc
    seen: dict[str, torch.Tensor] = {}
    hooks = [gc.register_forward_hook(lambda m, i, o: seen.update(x=i[0], gc=o)),
             gc.conv_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o)),
             gc.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("context", i[0])),
             gc.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("m", o)),
             model.blocks.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o))]
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for h in hooks:
            h.remove()
    return ref, seen


@pytest.mark.parametrize(("activation", "se"), [("silu", False), ("relu", True)])
def test_forward_reproduces_model_with_gc(activation: str, se: bool) -> None:
    """With the global-context block (and with the gate too): the block's input and output, its
    softmax weights, context and ``m``, the transformer output and the logits equal the model's
    own forward (hooks; the weights against torch's softmax of the hooked logits) to 1e-12."""
    model = ora.tiny_hybrid(activation, seed=2, se=se, gc=True)
    x = ora.tiny_hybrid_input(seed=3)
    ref, seen = _gc_seen(model, x)
    assert seen["gc"].shape == (2, 8, 8, 8) and seen["m"].shape == (2, 8, 1, 1)
    weights = torch.softmax(seen["attn"].flatten(1), -1).view(2, 8, 8)
    trace = ora.srd_hybrid_oracle_trace(model, x, 0)
    for n, s in enumerate(trace):
        f = s["forward"]
        assert torch.allclose(s["logits"], ref[n], rtol=1e-12, atol=1e-12)
        for k, want in (("ir", seen["x"][n]), ("gc", seen["gc"][n]), ("gc_attn", weights[n]),
                        ("gc_context", seen["context"][n, :, 0, 0]),
                        ("gc_m", seen["m"][n, :, 0, 0]), ("tokens", seen["tokens"][n])):
            assert torch.allclose(f[k], want, rtol=1e-12, atol=1e-12), k
    assert torch.allclose(ora.oracle_logits(model, x), ref, rtol=1e-12, atol=1e-12)


def test_gc_builder_is_non_trivial() -> None:
    """The block follows the inverted-residual block, its convs have biases at a scale that
    matters, its LayerNorm gains are drawn, its softmax weights are far from uniform, ``m`` is
    as large as the map it is added to and gets a sizeable share; the default has no block."""
    assert ora.tiny_hybrid("silu", seed=0).gc is None
    model = ora.tiny_hybrid("silu", seed=0, gc=True)
    gc = model.gc
    assert isinstance(gc, ora.GlobalContext) and not model.training
    assert list(dict(model.named_children())) == [
        "stem_conv", "stem_bn", "stem_act", "ir", "gc", "blocks", "norm", "head"]
    assert gc.conv_attn.weight.shape == (1, 8, 1, 1)
    assert gc.conv1.weight.shape == (4, 8, 1, 1) and gc.conv2.weight.shape == (8, 4, 1, 1)
    assert isinstance(gc.norm, ora.LayerNorm2d) and gc.norm.normalized_shape == (4,)
    assert isinstance(gc.act, nn.ReLU)
    for conv in (gc.conv_attn, gc.conv1, gc.conv2):
        assert conv.weight.dtype == DT and float(conv.bias.detach().abs().max()) > 0.1
    w = gc.norm.weight.detach()
    assert bool(((w >= 0.5) & (w <= 1.5)).all()) and float(w.max() - w.min()) > 0.1
    x = ora.tiny_hybrid_input(0, n=1)
    s = ora.srd_hybrid_oracle_trace(model, x, 0)[0]
    f = s["forward"]
    assert float(f["gc_attn"].max() / f["gc_attn"].min()) > 2.0
    assert float(f["gc_m"].norm()) > 0.3 * float(f["ir"].norm(dim=0).mean())
    assert abs(s["gc_m"]) > 0.1 * abs(float(s["logits"][0]))


GC_CUTS = [*CUTS, "gc_out", "gc_add_x+gc_m", "gc_add_x+gc_context", "gc_add_x+gc_pool_x"]


@pytest.mark.parametrize("activation", ["silu", "relu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_conservation_with_gc(activation: str, seed: int) -> None:
    """With the global-context block the pixel map and every cut (the block's output, its add
    with ``m`` or with the context in place of ``m``, its input) sum to the target logit per
    sample; the block's input relevance is its add share plus its pooling share, ``m``'s
    relevance reaches the context unchanged, nothing is lost, the weights get nothing."""
    for s in _traces_conserving(ora.tiny_hybrid(activation, seed=seed, gc=True), seed,
                                GC_CUTS):
        assert torch.allclose(s["sum"], s["gc_add_x"] + s["gc_pool_x"], rtol=0, atol=1e-15)
        assert s["gc_context"] == pytest.approx(s["gc_m"], rel=1e-12)
        assert "gc_weights" not in s


def test_gc_block_relevance_in_equals_out() -> None:
    """On the model's block and its input (hooks): for a mixed-sign relevance at the output the
    input's relevance sums to the same total, and with the trace's output relevance it is the
    trace's relevance at the block input."""
    model = ora.tiny_hybrid("silu", seed=3, gc=True)
    x = ora.tiny_hybrid_input(seed=4, n=1)
    _, seen = _gc_seen(model, x)
    r_out = torch.randn(8, 8, dtype=DT, generator=torch.Generator().manual_seed(5))
    r_in = ora.global_context_relevance(model.gc, seen["x"][0], r_out)
    assert r_in.shape == (8, 8)
    assert float(r_in.sum()) == pytest.approx(float(r_out.sum()), rel=1e-12, abs=1e-13)
    assert _rel(r_in, r_out) > 1e-2  # not the identity
    s = ora.srd_hybrid_oracle_trace(model, x, 1)[0]
    r_in = ora.global_context_relevance(model.gc, seen["x"][0], s["gc_out"])
    assert torch.allclose(r_in, s["sum"], rtol=1e-13, atol=1e-15)
    assert float(s["sum"].sum()) == pytest.approx(float(s["gc_out"].sum()), rel=1e-12)


def _hand_gc() -> tuple[ora.GlobalContext, torch.Tensor]:
    """GlobalContext(2) (1 hidden channel) on the 1 x 2 map x(0, 0) = (2, 1), x(0, 1) = (-2, 4).

    conv_attn = (ln(3)/4, 0), bias 0.7: logits ln(3)/2 + 0.7, -ln(3)/2 + 0.7, softmax weights
    w = (3/4, 1/4) (the bias cancels). context = (3/2, 3/4) + (-1/2, 1) = (1, 7/4).
    conv1 = (1/2, -1/4), bias 0.3: 1/2 - 7/16 + 3/10 = 0.3625 (one source, mu = 1).
    LayerNorm over the one channel: (v - mean) = 0, so its output is its shift 2; ReLU: 2.
    conv2 = (1/2, -1/2), bias 0: m = (1, -1). y(0, 0) = (3, 0), y(0, 1) = (-1, 3)."""
    gc = ora.GlobalContext(2).to(DT)
    assert gc.conv1.out_channels == 1
    with torch.no_grad():
        gc.conv_attn.weight.copy_(_t(math.log(3.0) / 4, 0).view(1, 2, 1, 1))
        gc.conv_attn.bias.fill_(0.7)
        gc.conv1.weight.copy_(_t(0.5, -0.25).view(1, 2, 1, 1))
        gc.conv1.bias.fill_(0.3)
        gc.norm.weight.fill_(1.3)
        gc.norm.bias.fill_(2.0)
        gc.conv2.weight.copy_(_t(0.5, -0.5).view(2, 1, 1, 1))
        gc.conv2.bias.zero_()
    return gc, torch.tensor([[[2.0, -2.0]], [[1.0, 4.0]]], dtype=DT)


def test_attention_pool_by_hand() -> None:
    """Attention pooling on x(0, 0) = (2, 1), x(0, 1) = (-2, 4) with the weights w = (3/4, 1/4)
    (the softmax of the hand block's logits):
    c_0 = (3/2, 3/4), c_1 = (-1/2, 1), context = (1, 7/4), ||context||^2 = 65/16;
    mu_0 = <c_0, context> / (65/16) = (45/16) / (65/16) = 9/13,
    mu_1 = (20/16) / (65/16) = 4/13 (sum 1). R(context) = 13: R(x) = (9, 4), the weights 0.
    Mutation (weights as sources, half each): R(x) = (9/2, 2), R(w) = (9/2, 2): x gets 13/2."""
    gc, x = _hand_gc()
    w = ora.gc_attention_weights(gc, x)
    assert torch.allclose(w, _t(3 / 4, 1 / 4).view(1, 2), atol=1e-15)
    with torch.no_grad():
        attn = gc.conv_attn(x[None])[0, 0]
    assert torch.allclose(torch.softmax(attn.flatten(), 0).view(1, 2), w, atol=1e-15)
    mu = ora.attention_pool_shares(x, w)
    assert torch.allclose(mu, _t(9 / 13, 4 / 13).view(1, 2), atol=1e-15)
    assert float(mu.sum()) == pytest.approx(1.0, abs=1e-15)
    r_x, r_w = ora.attention_pool_relevance(x, w, 13.0)
    assert torch.allclose(r_x, _t(9, 4).view(1, 2), atol=1e-14)
    assert not bool(r_w.any())
    m_x, m_w = ora.attention_pool_relevance(x, w, 13.0, weights_relevance=True)
    assert torch.allclose(m_x, _t(4.5, 2).view(1, 2), atol=1e-14)
    assert torch.allclose(m_w, _t(4.5, 2).view(1, 2), atol=1e-14)
    assert float(m_x.sum()) == pytest.approx(6.5, abs=1e-14)  # not 13: conservation broken


def test_broadcast_add_by_hand() -> None:
    """y(p) = x(p) + m with x(0, 0) = (2, 1), x(0, 1) = (-2, 4), m = (1, -1):
    y(0, 0) = (3, 0), ||y||^2 = 9: mu_x = 6/9 = 2/3, mu_m = 3/9 = 1/3;
    y(0, 1) = (-1, 3), ||y||^2 = 10: mu_x = 14/10 = 7/5, mu_m = -4/10 = -2/5.
    R(y) = (3, 5): R(x) = (2, 7), R(m) = 1/3 * 3 - 2/5 * 5 = -1 (the sum over positions);
    total 2 + 7 - 1 = 8 = 3 + 5. Mutation (m dropped): R(m) = 0, total 9."""
    x = torch.tensor([[[2.0, -2.0]], [[1.0, 4.0]]], dtype=DT)
    m = _t(1, -1)
    r_y = _t(3, 5).view(1, 2)
    r_x, r_m = ora.broadcast_add_relevance(x, m, r_y)
    assert torch.allclose(r_x, _t(2, 7).view(1, 2), atol=1e-14)
    assert r_m == pytest.approx(1 / 3 * 3 + (-2 / 5) * 5, abs=1e-14)
    assert r_m == pytest.approx(-1.0, abs=1e-14)
    assert float(r_x.sum()) + r_m == pytest.approx(8.0, abs=1e-14)
    d_x, d_m = ora.broadcast_add_relevance(x, m, r_y, drop_m=True)
    assert torch.allclose(d_x, r_x, atol=0) and d_m == 0.0
    assert float(d_x.sum()) + d_m == pytest.approx(9.0, abs=1e-14)


def test_gc_block_by_hand() -> None:
    """The hand block (see ``_hand_gc``) with R(y) = (3, 5): the add gives R(x) = (2, 7) and
    R(m) = -1 (test_broadcast_add_by_hand); m's MLP passes -1 to the context unchanged; the
    pooling gives (9/13, 4/13) of it (test_attention_pool_by_hand). So
    R(x) = (2 - 9/13, 7 - 4/13) = (17/13, 87/13), sum 8 = 3 + 5.
    Mutations: m dropped: (2, 7), sum 9; weights as sources: (2 - 9/26, 7 - 4/26), sum 15/2."""
    gc, x = _hand_gc()
    with torch.no_grad():
        y = gc(x[None])[0]
    assert torch.allclose(y, torch.tensor([[[3.0, -1.0]], [[0.0, 3.0]]], dtype=DT), atol=1e-15)
    r_y = _t(3, 5).view(1, 2)
    r_x = ora.global_context_relevance(gc, x, r_y)
    assert torch.allclose(r_x, _t(17 / 13, 87 / 13).view(1, 2), atol=1e-14)
    assert float(r_x.sum()) == pytest.approx(8.0, abs=1e-14)
    drop = ora.global_context_relevance(gc, x, r_y, mutation="gc_drop_m")
    assert torch.allclose(drop, _t(2, 7).view(1, 2), atol=1e-14)
    half = ora.global_context_relevance(gc, x, r_y, mutation="gc_weights_relevance")
    assert torch.allclose(half, _t(2 - 9 / 26, 7 - 4 / 26).view(1, 2), atol=1e-14)
    with pytest.raises(ValueError):
        ora.global_context_relevance(gc, x, r_y, mutation="nope")


def test_gc_loops_match_vectorized_form() -> None:
    """Given the relevance the oracle puts on the block's output, R(m), the input's add and
    pooling shares and their sum equal a vectorized form of the rule fed by the model's own
    tensors (hooks; the weights from torch's softmax), no loops over positions."""
    model = ora.tiny_hybrid("relu", seed=4, gc=True)
    x = ora.tiny_hybrid_input(seed=5)
    _, seen = _gc_seen(model, x)
    trace = ora.srd_hybrid_oracle_trace(model, x, 2)
    r_out = torch.stack([s["gc_out"] for s in trace])              # (N, H, W)
    with torch.no_grad():
        xin, m = seen["x"], seen["m"]                                # (N, C, H, W), (N, C, 1, 1)
        y = xin + m
        yy = (y * y).sum(1)
        mu_x = (xin * y).sum(1) / yy
        mu_m = (m * y).sum(1) / yy
        r_m = (mu_m * r_out).sum((1, 2))                             # (N,)
        w = torch.softmax(seen["attn"].flatten(1), -1).view_as(r_out)
        c = w[:, None] * xin                                         # (N, C, H, W)
        ctx = c.sum((2, 3))                                          # (N, C)
        mu_p = (c * ctx[:, :, None, None]).sum(1) / (ctx * ctx).sum(1)[:, None, None]
        add_x = mu_x * r_out
        pool_x = mu_p * r_m[:, None, None]
    assert torch.allclose(torch.tensor([s["gc_m"] for s in trace], dtype=DT), r_m, rtol=1e-11,
                          atol=1e-14)
    for k, want in (("gc_add_x", add_x), ("gc_pool_x", pool_x), ("sum", add_x + pool_x)):
        got = torch.stack([s[k] for s in trace])
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13), k


@pytest.mark.parametrize("mutation", ora.GC_MUTATIONS)
def test_gc_mutations_break_conservation(mutation: str) -> None:
    """A wrong global-context rule (the softmax weights get relevance, or m's share is dropped)
    no longer sums to the logit (off by more than 5 %), by exactly what it withheld (the
    weights' relevance; the correct R(m)); the definition conserves on the same case."""
    model = ora.tiny_hybrid("silu", seed=0, gc=True)
    x = ora.tiny_hybrid_input(seed=1, n=1)
    with torch.no_grad():
        logit = float(model(x)[0, 2])
    ref = ora.srd_hybrid_oracle_trace(model, x, 2)[0]
    alt = ora.srd_hybrid_oracle_trace(model, x, 2, misread=mutation)[0]
    assert float(ref["pixel"].sum()) == pytest.approx(logit, rel=1e-9)
    got = float(alt["pixel"].sum())
    assert abs(got - logit) > 0.05 * abs(logit)
    withheld = (float(alt["gc_weights"].sum()) if mutation == "gc_weights_relevance"
                else ref["gc_m"])
    assert got + withheld == pytest.approx(logit, rel=1e-9)


def test_gc_mutation_needs_the_block() -> None:
    model = ora.tiny_hybrid("relu", seed=0)
    with pytest.raises(ValueError):
        ora.srd_hybrid_oracle(model, ora.tiny_hybrid_input(0, n=1), 0, misread="gc_drop_m")


def test_gc_with_zero_m_is_transparent() -> None:
    """With conv2's weight and bias zero, m = 0: every y(p) is x(p) (mu_x = 1, mu_m = 0), R(m)
    and the pooling shares are 0, and the map equals that of the same model without the block."""
    model = ora.tiny_hybrid("silu", seed=8, gc=True)
    with torch.no_grad():
        model.gc.conv2.weight.zero_()
        model.gc.conv2.bias.zero_()
    x = ora.tiny_hybrid_input(seed=9, n=1)
    s = ora.srd_hybrid_oracle_trace(model, x, 3)[0]
    assert s["gc_m"] == 0.0 and not bool(s["gc_pool_x"].any())
    plain = ora.TinyHybrid("silu").to(DT).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("gc.") for k in unexpected)
    p = ora.srd_hybrid_oracle_trace(plain, x, 3)[0]
    assert torch.allclose(p["logits"], s["logits"], rtol=1e-13, atol=1e-13)
    assert torch.allclose(s["pixel"], p["pixel"], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------- ECA gate, max pooling, token max pooling

#: option sets of the new blocks (and their combinations with the older ones) for the forward
#: and conservation checks, each with one activation
NEW_BLOCKS = [
    ("max_pool", "silu"), ("max_pool", "relu"), ("token_max", "silu"), ("token_max", "relu"),
    ("eca", "silu"), ("eca+gc", "relu"), ("eca+max_pool+token_max", "relu"),
    ("se+eca+gc+max_pool+token_max", "silu"),
]


def _opts(blocks: str) -> dict[str, bool]:
    return {k: True for k in blocks.split("+")}


def _plain_forward(model: ora.TinyHybrid, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's new blocks as a plain torch computation, written differently from
    ``TinyHybrid.forward``: the ECA gate by ``F.conv1d`` and ``torch.sigmoid`` on the channel
    means, the max pooling by unfolding a -inf padded map, the token max pooling by
    ``torch.maximum`` of the two halves; the rest by the model's own modules."""
    out = {}
    with torch.no_grad():
        m = model.ir(model.stem_act(model.stem_bn(model.stem_conv(x))))
        out["ir"] = m
        if model.eca is not None:
            z = F.conv1d(m.mean((2, 3))[:, None, :], model.eca.conv.weight, padding=1)
            out["eca_gate"] = torch.sigmoid(z)[:, 0]                    # (N, C)
            m = m * out["eca_gate"][:, :, None, None]
            out["eca"] = m
        if model.gc is not None:
            m = model.gc(m)
            out["gc"] = m
        if model.max_pool:
            padded = F.pad(m, (1, 1, 1, 1), value=-math.inf)
            m = padded.unfold(2, 3, 2).unfold(3, 3, 2).amax((-2, -1))
            out["pool"] = m
        t = m.flatten(2).transpose(1, 2)
        if model.token_max:
            half = t.shape[1] // 2
            out["tokens_pre"] = t
            t = torch.maximum(t[:, :half], t[:, half:])
        out["tmax"] = t  # the transformer input
        out["tokens"] = model.blocks(t)
        out["logits"] = model.head(model.norm(out["tokens"]).mean(1))
    return out


@pytest.mark.parametrize(("blocks", "activation"), NEW_BLOCKS)
def test_forward_reproduces_model_with_new_blocks(blocks: str, activation: str) -> None:
    """With the ECA gate and / or the max poolings: ``TinyHybrid.forward`` equals a plain torch
    computation of the same operations (:func:`_plain_forward`), and the oracle's own float64
    recomputation (the gate value, the gated map, the pooled map, the tokens before and after
    the token max pooling, the transformer output, the logits) equals both to 1e-12."""
    model = ora.tiny_hybrid(activation, seed=2, **_opts(blocks))
    x = ora.tiny_hybrid_input(seed=3)
    plain = _plain_forward(model, x)
    seen: dict[str, torch.Tensor] = {}
    hook = model.blocks.register_forward_pre_hook(lambda m, i: seen.__setitem__("tin", i[0]))
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        hook.remove()
    assert torch.allclose(ref, plain["logits"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(seen["tin"], plain["tmax"], rtol=0, atol=0)
    n_tok = 16 if "max_pool" in blocks else 64
    n_tok = n_tok // 2 if "token_max" in blocks else n_tok
    assert plain["tmax"].shape == (2, n_tok, 8)
    trace = ora.srd_hybrid_oracle_trace(model, x, 0)
    keys = [k for k in ("ir", "eca", "eca_gate", "gc", "pool", "tokens_pre", "tmax", "tokens")
            if k in plain and (k != "tmax" or "token_max" in blocks)]
    for n, s in enumerate(trace):
        assert torch.allclose(s["logits"], ref[n], rtol=1e-12, atol=1e-12)
        for k in keys:
            assert torch.allclose(s["forward"][k], plain[k][n], rtol=1e-12, atol=1e-12), k
    assert torch.allclose(ora.oracle_logits(model, x), ref, rtol=1e-12, atol=1e-12)


def test_new_blocks_builder_is_non_trivial() -> None:
    """Defaults off; the ECA gate follows the inverted-residual block and precedes the GC block,
    its Conv1d (1 -> 1, kernel 3, no bias) is drawn, its gate value varies over channels; in
    the max pooling most windows have several winners and some position wins in two windows;
    in the token max pooling most pairs have entries owned by each of the two tokens."""
    model = ora.tiny_hybrid("silu", seed=0)
    assert model.eca is None and not model.max_pool and not model.token_max
    assert ora.tiny_hybrid_input(0).shape == (2, 3, 16, 16)
    model = ora.tiny_hybrid("silu", seed=0, eca=True, gc=True, max_pool=True, token_max=True)
    assert list(dict(model.named_children())) == [
        "stem_conv", "stem_bn", "stem_act", "ir", "eca", "gc", "blocks", "norm", "head"]
    conv = model.eca.conv
    assert conv.weight.shape == (1, 1, 3) and conv.bias is None and conv.padding == (1,)
    assert conv.weight.dtype == DT and float(conv.weight.detach().abs().min()) > 0.05
    s = ora.srd_hybrid_oracle_trace(model, ora.tiny_hybrid_input(0, n=1), 0)[0]
    f = s["forward"]
    assert float(f["eca_gate"].max() - f["eca_gate"].min()) > 0.2
    assert f["pool"].shape == (8, 4, 4) and f["tmax"].shape == (8, 8)
    winners = [set(cell) for row in f["pool_winners"] for cell in row]
    assert sum(len(w) >= 2 for w in winners) >= 12
    counts: dict[tuple[int, int], int] = {}
    for w in winners:
        for p in w:
            counts[p] = counts.get(p, 0) + 1
    assert max(counts.values()) >= 2  # overlapping windows: one position, several outputs
    pre = f["tokens_pre"]
    mixed = sum(bool((pre[j] > pre[j + 8]).any()) and bool((pre[j] < pre[j + 8]).any())
                for j in range(8))
    assert mixed >= 6


NEW_CUTS = {"eca": ["eca_out"], "gc": ["gc_out", "gc_add_x+gc_m"],
            "max_pool": ["pool_out", "pool_in"], "token_max": ["tmax_in"]}


@pytest.mark.parametrize(("blocks", "activation"), NEW_BLOCKS)
def test_conservation_with_new_blocks(blocks: str, activation: str) -> None:
    """With the new blocks (alone, with each other, with the SE gate and the GC block) the pixel
    map and every cut (at the ECA output, at the max pooling's output and input, at the token
    max pooling's input and output) sum to the target logit per sample; nothing is lost, the
    ECA gate gets nothing and passes each position's relevance unchanged when nothing else
    follows it on the map."""
    cuts = [*CUTS]
    for k in blocks.split("+"):
        cuts += NEW_CUTS.get(k, [])
    model = ora.tiny_hybrid(activation, seed=1, **_opts(blocks))
    for s in _traces_conserving(model, 1, cuts):
        if "eca" in blocks:
            assert s["eca_gate"] == 0.0
        if blocks == "eca":
            assert torch.allclose(s["sum"], s["eca_out"], rtol=1e-15, atol=0)
        if "token_max" in blocks:
            assert len(s["tmax_in"]) == 2 * len(s["tokens_in"])


def _hand_pool_map() -> torch.Tensor:
    """2 channels on a 2 x 2 map: channel 0 [[1, 3], [-4, 2]], channel 1 [[-5, 2], [0, 4]]."""
    return torch.tensor([[[1.0, 3.0], [-4.0, 2.0]], [[-5.0, 2.0], [0.0, 4.0]]], dtype=DT)


def test_max_pool_by_hand() -> None:
    """F.max_pool2d(x, 3, 2, 1) on the 2 x 2 map of ``_hand_pool_map``: one output, whose window
    (rows and cols -1 .. 1) holds all four positions (the rest is padding, never a winner).
    Channel 0: max 3 at (0, 1); channel 1: max 4 at (1, 1); y = (3, 4), ||y||^2 = 25.
    c_(0,1) = (3, 0), c_(1,1) = (0, 4); (0, 0) and (1, 0) won nothing and are no sources.
    mu_(0,1) = 9/25, mu_(1,1) = 16/25 (sum 1). R(y) = 5: R = [[0, 9/5], [0, 16/5]], sum 5.
    Mutation max_even (split evenly over the two winners): [[0, 5/2], [0, 5/2]] (sum 5, but
    not the answer). Mutation max_abs (each channel to the largest |x|, contribution that x):
    channel 0 to (1, 0) with -4, channel 1 to (0, 0) with -5: c_(0,0) = (0, -5),
    c_(1,0) = (-4, 0), mu_(0,0) = -20/25, mu_(1,0) = -12/25: R = [[-4, 0], [-12/5, 0]], sum
    -32/5, not 5 (conservation fails)."""
    x = _hand_pool_map()
    y, idx = F.max_pool2d(x[None], 3, 2, 1, return_indices=True)
    assert torch.equal(y[0, :, 0, 0], _t(3, 4)) and idx[0, :, 0, 0].tolist() == [1, 3]
    got = ora.max_pool_shares(x, 0, 0)
    assert [p for p, _ in got] == [(0, 1), (1, 1)]
    assert [m for _, m in got] == pytest.approx([9 / 25, 16 / 25], abs=1e-15)
    r = ora.max_pool_relevance(x, _t(5).view(1, 1))
    assert torch.allclose(r, torch.tensor([[0, 9 / 5], [0, 16 / 5]], dtype=DT), atol=1e-15)
    assert float(r.sum()) == pytest.approx(5.0, abs=1e-14)
    even = ora.max_pool_relevance(x, _t(5).view(1, 1), mutation="max_even")
    assert torch.allclose(even, torch.tensor([[0, 2.5], [0, 2.5]], dtype=DT), atol=1e-15)
    assert not torch.allclose(even, r, atol=0.5)  # the known answer tells it apart
    absm = ora.max_pool_relevance(x, _t(5).view(1, 1), mutation="max_abs")
    assert [p for p, _ in ora.max_pool_shares(x, 0, 0, mutation="max_abs")] == [(0, 0), (1, 0)]
    assert torch.allclose(absm, torch.tensor([[-4, 0], [-12 / 5, 0]], dtype=DT), atol=1e-14)
    assert float(absm.sum()) == pytest.approx(-32 / 5, abs=1e-14)
    with pytest.raises(ValueError):
        ora.max_pool_relevance(x, _t(5).view(1, 1), mutation="nope")


def test_max_pool_overlapping_windows_by_hand() -> None:
    """F.max_pool2d(x, 3, 2, 1) on a 3 x 3 map with 2 channels: 2 x 2 outputs whose windows
    (rows / cols {0, 1} or {1, 2}) all hold the centre (1, 1).
    Channel 0 [[1, 2, 3], [4, 9, 5], [6, 7, 8]]: the centre 9 wins every window.
    Channel 1 [[5, 1, 2], [3, -1, 4], [2, 6, 7]]: (0, 0) = 5, (1, 2) = 4, (2, 1) = 6, (2, 2) = 7.
    y(0, 0) = (9, 5), ||y||^2 = 106: centre 81/106, (0, 0) 25/106;
    y(0, 1) = (9, 4), 97: centre 81/97, (1, 2) 16/97;
    y(1, 0) = (9, 6), 117: centre 81/117, (2, 1) 36/117;
    y(1, 1) = (9, 7), 130: centre 81/130, (2, 2) 49/130.
    R(y) = [[106, 97], [117, 130]]: the centre collects 4 x 81 = 324 over the four windows,
    (0, 0) 25, (1, 2) 16, (2, 1) 36, (2, 2) 49, the rest 0; sum 450 = 106 + 97 + 117 + 130."""
    x = torch.tensor([[[1.0, 2, 3], [4, 9, 5], [6, 7, 8]],
                      [[5.0, 1, 2], [3, -1, 4], [2, 6, 7]]], dtype=DT)
    with torch.no_grad():
        y = F.max_pool2d(x[None], 3, 2, 1)[0]
    assert torch.equal(y[0], torch.full((2, 2), 9.0, dtype=DT))
    assert torch.equal(y[1], torch.tensor([[5.0, 4], [6, 7]], dtype=DT))
    got = ora.max_pool_shares(x, 1, 0)
    assert [p for p, _ in got] == [(1, 1), (2, 1)]
    assert [m for _, m in got] == pytest.approx([9 / 13, 4 / 13], abs=1e-15)
    r = ora.max_pool_relevance(x, torch.tensor([[106.0, 97], [117, 130]], dtype=DT))
    want = torch.tensor([[25.0, 0, 0], [0, 324, 16], [0, 36, 49]], dtype=DT)
    assert torch.allclose(r, want, atol=1e-12)
    assert float(r.sum()) == pytest.approx(450.0, abs=1e-12)


def test_max_pool_tie_goes_to_torchs_index() -> None:
    """A four-way tie in channel 0 (all 2) of the 2 x 2 map, channel 1 [[-1, 0], [1, -3]]:
    y = (2, 1), ||y||^2 = 5. Channel 0 goes to the index torch's max_pool2d reports (where its
    gradient goes, alone), channel 1 to (1, 0): mu = 4/5 and 1/5."""
    x = torch.tensor([[[2.0, 2.0], [2.0, 2.0]], [[-1.0, 0.0], [1.0, -3.0]]], dtype=DT)
    xg = x[None].clone().requires_grad_(True)
    y, idx = F.max_pool2d(xg, 3, 2, 1, return_indices=True)
    y[0, 0, 0, 0].backward()
    flat = int(idx[0, 0, 0, 0])
    tie = (flat // 2, flat % 2)
    assert float(xg.grad[0, 0, tie[0], tie[1]]) == 1.0 and float(xg.grad.sum()) == 1.0
    got = dict(ora.max_pool_shares(x, 0, 0))
    assert tie != (1, 0) and set(got) == {tie, (1, 0)}
    assert got[tie] == pytest.approx(4 / 5, abs=1e-15)
    assert got[(1, 0)] == pytest.approx(1 / 5, abs=1e-15)


def test_token_max_by_hand() -> None:
    """Token max pooling t.view(1, 2, 2, 2).amax(1) of the 4 tokens x0 = (1, 2), x1 = (0, -1),
    x2 = (3, 2), x3 = (-2, -3): y0 = max(x0, x2) = (3, 2), y1 = max(x1, x3) = (0, -1).
    y0: entry 0 won by x2; entry 1 a tie (2 = 2), owned half and half (torch's amax splits its
    gradient 1/2, 1/2): ||y0||^2 = 13, mu_0 = (4/2)/13 = 2/13, mu_2 = (9 + 4/2)/13 = 11/13.
    y1: both entries won by x1 (0 > -2, -1 > -3): mu_1 = 1, mu_3 = 0.
    R(y) = (13, 7): R(x) = (2, 7, 11, 0), sum 20.
    Mutation max_even: y0 split 1/2, 1/2 over its two owners, y1 all to x1: (13/2, 7, 13/2, 0).
    Mutation max_abs: y0: entry 0 |3| > |1| to x2 (3), entry 1 |2| = |2| to the first, x0 (2);
    y1: entry 0 |-2| > |0| to x3 (-2), entry 1 |-3| > |-1| to x3 (-3): c_3 = (-2, -3),
    mu_3 = 3/1 = 3 with mu_1 = 0: R(x) = (4, 0, 9, 21), sum 34, not 20."""
    tokens = torch.tensor([[1.0, 2], [0, -1], [3, 2], [-2, -3]], dtype=DT)
    tg = tokens[None].clone().requires_grad_(True)
    y = tg.view(1, 2, 2, 2).amax(dim=1)
    assert torch.equal(y[0].detach(), torch.tensor([[3.0, 2], [0, -1]], dtype=DT))
    y[0, 0, 1].backward()
    assert tg.grad[0, :, 1].tolist() == [0.5, 0.0, 0.5, 0.0]  # the tie: half each
    mu = ora.token_max_shares(tokens)
    assert mu[0] == pytest.approx([2 / 13, 11 / 13], abs=1e-15)
    assert mu[1] == pytest.approx([1.0, 0.0], abs=1e-15)
    r_out = _t(13, 7)
    r = ora.token_max_relevance(tokens, r_out)
    assert torch.allclose(r, _t(2, 7, 11, 0), atol=1e-14)
    even = ora.token_max_relevance(tokens, r_out, mutation="max_even")
    assert torch.allclose(even, _t(6.5, 7, 6.5, 0), atol=1e-14)
    absm = ora.token_max_relevance(tokens, r_out, mutation="max_abs")
    assert torch.allclose(absm, _t(4, 0, 9, 21), atol=1e-13)
    assert float(absm.sum()) == pytest.approx(34.0, abs=1e-13)


def test_eca_gate_by_hand() -> None:
    """EcaModule (Conv1d weight (1, 0, -1), no bias) on the 3-channel 1 x 2 map
    x(0, 0) = (1, ln 3 + 1, -2), x(0, 1) = (-1, ln 3 - 1, 2): channel means m = (0, ln 3, 0);
    conv[c] = m[c - 1] - m[c + 1] (zero padding) = (-ln 3, 0, ln 3); gate
    g = sigmoid = (1/4, 1/2, 3/4); y(p) = x(p) ⊙ g. The gate is a constant weight: each y(p)
    has the one source x(p) (mu = 1), so R(y) = (5, -2) gives R(x) = (5, -2); the gate gets
    nothing. Mutation eca_gate_half: (5/2, -1), half of each left on the gate."""
    eca = ora.EcaModule().to(DT)
    with torch.no_grad():
        eca.conv.weight.copy_(_t(1, 0, -1).view(1, 1, 3))
    ln3 = math.log(3.0)
    x = torch.tensor([[[1.0, -1.0]], [[ln3 + 1, ln3 - 1]], [[-2.0, 2.0]]], dtype=DT)
    g = ora.eca_gate(eca, x)
    assert torch.allclose(g, _t(1 / 4, 1 / 2, 3 / 4), atol=1e-15)
    with torch.no_grad():
        y = eca(x[None])[0]
    assert torch.allclose(y, x * g[:, None, None], atol=1e-15)
    r_out = _t(5, -2).view(1, 2)
    assert torch.allclose(ora.eca_relevance(eca, x, r_out), r_out, rtol=0, atol=0)
    half = ora.eca_relevance(eca, x, r_out, mutation="eca_gate_half")
    assert torch.allclose(half, _t(2.5, -1).view(1, 2), atol=1e-15)


def test_max_pools_loops_match_autograd_form() -> None:
    """In the full model (ECA gate, max pooling and token max pooling): given the relevance the
    oracle puts on each pooling's output, the relevance it puts on its input equals a form of the
    rule by autograd, fed by the model's own tensors (hooks), no loops: for a max, the gradient
    of ``sum_t k_t ||y(t)||^2 / 2`` (``k_t = R(y(t)) / ||y(t)||^2`` held constant) with respect
    to the input is ``k_t y_c(t)`` on the entries it won (torch's own routing, the tie splits
    included), so ``R(x(p)) = <x(p), grad(p)>`` is ``sum_t k_t sum_{c won by p} y_c(t)^2``."""
    model = ora.tiny_hybrid("silu", seed=4, eca=True, max_pool=True, token_max=True)
    x = ora.tiny_hybrid_input(seed=5)
    seen: dict[str, torch.Tensor] = {}
    hook = model.eca.register_forward_hook(lambda m, i, o: seen.__setitem__("eca", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    trace = ora.srd_hybrid_oracle_trace(model, x, 2)

    def autograd_form(inp: torch.Tensor, op, r_out: torch.Tensor, dim: int) -> torch.Tensor:
        inp = inp.detach().clone().requires_grad_(True)
        y = op(inp)
        yy = (y * y).sum(dim)
        k = (r_out / yy).detach()
        (grad,) = torch.autograd.grad((k * yy / 2).sum(), inp)
        return (inp * grad).sum(dim).detach()

    pool_in = autograd_form(seen["eca"], lambda m: F.max_pool2d(m, 3, 2, 1),
                            torch.stack([s["pool_out"] for s in trace]), 1)
    assert torch.allclose(torch.stack([s["pool_in"] for s in trace]), pool_in, rtol=1e-10,
                          atol=1e-14)
    with torch.no_grad():
        tokens = F.max_pool2d(seen["eca"], 3, 2, 1).flatten(2).transpose(1, 2)
    tmax_in = autograd_form(tokens, lambda t: t.view(2, 2, 8, 8).amax(dim=1),
                            torch.tensor([s["tokens_in"] for s in trace], dtype=DT), -1)
    assert torch.allclose(torch.tensor([s["tmax_in"] for s in trace], dtype=DT), tmax_in,
                          rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("mutation", "blocks"), [
    ("max_abs", "max_pool"), ("max_abs", "token_max"), ("max_even", "max_pool"),
    ("max_even", "token_max"), ("eca_gate_half", "eca")])
def test_new_mutations_are_caught(mutation: str, blocks: str) -> None:
    """A wrong max-pooling rule or ECA rule is caught: ``max_abs`` (routing by |x|) and
    ``eca_gate_half`` (half left on the gate) miss the logit by far more than the 1e-9 of the
    conservation checks (``eca_gate_half`` by exactly half), ``max_even`` conserves (the hand
    examples tell it apart) but moves the map by more than 10 %; the definition conserves on the
    same case."""
    logit, ref, alt = _definition_and(mutation, **_opts(blocks))
    assert float(ref.sum()) == pytest.approx(logit, rel=1e-9)
    got = float(alt.sum())
    if mutation == "max_even":
        assert got == pytest.approx(logit, rel=1e-9)
        assert _rel(alt, ref) > 0.1
    elif mutation == "eca_gate_half":
        assert got == pytest.approx(logit / 2, rel=1e-9)
    else:
        assert abs(got - logit) > 1e-3 * abs(logit)
        assert _rel(alt, ref) > 1e-2


def test_new_mutations_need_their_block() -> None:
    model = ora.tiny_hybrid("relu", seed=0)
    x = ora.tiny_hybrid_input(0, n=1)
    for mutation in (*ora.MAX_MUTATIONS, *ora.ECA_MUTATIONS):
        with pytest.raises(ValueError):
            ora.srd_hybrid_oracle(model, x, 0, misread=mutation)
