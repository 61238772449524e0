"""Self-checks of the token-mixing SRD oracle (tests/srd_mixer_oracle.py), independent of
srdxai's implementation: the oracle's recomputed forward equals the model's own (logits and
every block's output, all three kinds, depth 1 and 2), every cut through the network carries
exactly the target logit, batches are per sample (one target or one per sample), the
token-mixing rule gives hand-derived numbers (bias split by norms, a zero source vector getting
none of the bias, an even split when all contributions vanish, a zero output passing nothing),
the loop code agrees with a vectorized form of the whole definition fed by the model's own
tensors (hooks), gMLP's gate sends nothing to ``u`` and everything to ``v``, and deliberately
wrong rules (the token-mixing bias split evenly; the gate the other way round) conserve the logit
too but change the map, so a comparison of maps can catch them. The models are non-trivial:
every bias and affine parameter is non-zero, the maps are not zero, and targets differ."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import srd_mixer_oracle as ora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)

DT = torch.float64


def _t(*v: float) -> Tensor:
    return torch.tensor(v, dtype=DT)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _capture(model: torch.nn.Module, x: Tensor, modules: dict[str, torch.nn.Module]
             ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """The model's logits on ``x`` and (first input, output) of each of ``modules``."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, (i[0], o)))
             for k, mod in modules.items()]
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for h in hooks:
            h.remove()
    return ref, seen


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("kind", ora.KINDS)
def test_forward_reproduces_model(kind: str, depth: int) -> None:
    """Logits and each block's output tokens equal the model's own forward to 1e-12."""
    model = ora.tiny_mixer_model(kind, seed=3, depth=depth)
    x = ora.tiny_mixer_input(seed=4, n=2)
    ref, seen = _capture(model, x, {f"b{i}": b for i, b in enumerate(model.blocks)})
    assert float((ora.oracle_mixer_logits(model, x) - ref).abs().max()) < 1e-12
    trace = ora.srd_mixer_oracle_trace(model, x, 0)
    for n, s in enumerate(trace):
        assert float((s["logits"] - ref[n]).abs().max()) < 1e-12
        assert len(s["blocks"]) == depth
        for i, tokens in enumerate(s["blocks"]):
            out = seen[f"b{i}"][1][n]
            assert out.shape == (ora.TOKENS, ora.DIM)
            assert float((torch.stack(tokens) - out).abs().max()) < 1e-12


def test_forward_token_order_matters() -> None:
    """The forward check above can fail on a wrong token order: transposing the patch grid
    (column-major tokens) changes the logits (the token-mixing Linears see the order)."""
    model = ora.tiny_mixer_model("resmlp", seed=3, depth=1)
    x = ora.tiny_mixer_input(seed=4, n=1)
    with torch.no_grad():
        assert float((model(x) - model(x.transpose(-1, -2))).abs().max()) > 1e-3
    assert float((ora.oracle_mixer_logits(model, x) - model(x).detach()).abs().max()) < 1e-12


# --------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("kind", ora.KINDS)
@pytest.mark.parametrize("seed,target", [(0, 0), (1, 3), (2, 4)])
def test_conservation(kind: str, seed: int, target: int) -> None:
    """The pixel map, the relevance at each block input and at the final norm's input all sum
    to the target logit (1e-9 relative), and nothing is lost beyond rounding."""
    model = ora.tiny_mixer_model(kind, seed=seed)
    x = ora.tiny_mixer_input(seed=seed + 10, n=2)
    for s in ora.srd_mixer_oracle_trace(model, x, target):
        logit = float(s["logits"][target])
        tol = 1e-9 * max(1.0, abs(logit))
        assert abs(float(s["pixel"].sum()) - logit) <= tol
        assert len(s["stream"]) == 3
        for cut in s["stream"]:
            assert len(cut) == ora.TOKENS
            assert abs(sum(cut) - logit) <= tol
        assert s["pooled"] == logit
        assert s["lost"] < 1e-12


# --------------------------------------------------------------------------- batches, targets


@pytest.mark.parametrize("kind", ora.KINDS)
def test_batch_is_per_sample(kind: str) -> None:
    model = ora.tiny_mixer_model(kind, seed=5)
    x = ora.tiny_mixer_input(seed=6, n=3)
    batch = ora.srd_mixer_oracle(model, x, 2)
    assert batch.shape == (3, 16, 16) and batch.dtype == DT
    for n in range(3):
        single = ora.srd_mixer_oracle(model, x[n:n + 1], 2)[0]
        assert float((batch[n] - single).abs().max()) < 1e-14


def test_per_sample_targets() -> None:
    """A tensor (or list) of targets gives each sample its own class."""
    model = ora.tiny_mixer_model("mixer", seed=5)
    x = ora.tiny_mixer_input(seed=6, n=3)
    targets = torch.tensor([4, 0, 2])
    maps = ora.srd_mixer_oracle(model, x, targets)
    assert torch.equal(maps, ora.srd_mixer_oracle(model, x, [4, 0, 2]))
    logits = ora.oracle_mixer_logits(model, x)
    for n, c in enumerate(targets.tolist()):
        assert torch.equal(maps[n], ora.srd_mixer_oracle(model, x[n:n + 1], c)[0])
        assert abs(float(maps[n].sum()) - float(logits[n, c])) < 1e-12
    with pytest.raises(AssertionError):
        ora.srd_mixer_oracle(model, x, [1, 2])


# --------------------------------------------------------------------------- the token-mixing rule


def test_token_mixing_shares_by_hand() -> None:
    """Output token 0: W[0] = (3, 1), b[0] = 1, x(0) = (1, 0), x(1) = (0, 2):
    c0 = (3, 0), c1 = (0, 2), y = (4, 3), ||y||^2 = 25; the bias (1, 1) goes 3/5 : 2/5, so
    mu0 = <(3.6, 0.6), (4, 3)> / 25 = 0.648, mu1 = <(0.4, 2.4), (4, 3)> / 25 = 0.352.
    Output token 1: W[1] = (-1, 0.5), b[1] = -2: c0 = (-1, 0), c1 = (0, 1), y = (-3, -1),
    ||y||^2 = 10, bias (-2, -2) split 1/2 : 1/2, mu0 = <(-2, -1), (-3, -1)> / 10 = 0.7,
    mu1 = <(-1, 0), (-3, -1)> / 10 = 0.3."""
    w = torch.tensor([[3.0, 1.0], [-1.0, 0.5]], dtype=DT)
    b = _t(1.0, -2.0)
    xs = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=DT)
    assert ora.token_mixing_shares(w, b, xs, 0) == pytest.approx([0.648, 0.352], abs=1e-14)
    assert ora.token_mixing_shares(w, b, xs, 1) == pytest.approx([0.7, 0.3], abs=1e-14)
    # a list of vectors works too
    assert ora.token_mixing_shares(w, b, list(xs), 1) == pytest.approx([0.7, 0.3], abs=1e-14)
    # the mutation (bias split evenly, (0.5, 0.5) each) gives other numbers for token 0:
    # mu0 = <(3.5, 0.5), (4, 3)> / 25 = 0.62, mu1 = <(0.5, 2.5), (4, 3)> / 25 = 0.38
    assert ora.token_mixing_shares(w, b, xs, 0, even_bias=True) == pytest.approx(
        [0.62, 0.38], abs=1e-14)


def test_token_mixing_zero_source_gets_no_bias() -> None:
    """x(1) = 0 with a non-zero weight: c1 = 0 takes none of the bias. W[0] = (3, 5, 1),
    b[0] = 1, x = (1, 0), (0, 0), (0, 2): as the first hand example, mu = (0.648, 0, 0.352).
    Alone with a zero source: W = (3, 5), x = (1, 0), (0, 0): y = (4, 1), mu = (1, 0)."""
    xs = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=DT)
    mu = ora.token_mixing_shares(torch.tensor([[3.0, 5.0, 1.0]], dtype=DT), _t(1.0), xs, 0)
    assert mu == pytest.approx([0.648, 0.0, 0.352], abs=1e-14)
    assert mu[1] == 0.0
    mu = ora.token_mixing_shares(torch.tensor([[3.0, 5.0]], dtype=DT), _t(1.0), xs[:2], 0)
    assert mu == pytest.approx([1.0, 0.0], abs=1e-14)
    # a zero weight does the same for a non-zero vector: W = (3, 0, 1)
    mu = ora.token_mixing_shares(torch.tensor([[3.0, 0.0, 1.0]], dtype=DT), _t(1.0),
                                 torch.tensor([[1.0, 0.0], [7.0, -7.0], [0.0, 2.0]], dtype=DT), 0)
    assert mu == pytest.approx([0.648, 0.0, 0.352], abs=1e-14)


def test_token_mixing_all_contributions_vanish() -> None:
    """W[0] = 0 (or all x = 0): y = b[0] * ones, split evenly, mu = 1/3 each; b = 0 as well
    gives y = 0, which passes nothing; without a bias, y = 0 from cancelling sources too."""
    xs = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=DT)
    zero_w = torch.zeros(1, 3, dtype=DT)
    assert ora.token_mixing_shares(zero_w, _t(-1.5), xs, 0) == pytest.approx([1 / 3] * 3,
                                                                              abs=1e-15)
    assert ora.token_mixing_shares(torch.ones(1, 3, dtype=DT), _t(2.0), torch.zeros(3, 2),
                                   0) == pytest.approx([1 / 3] * 3, abs=1e-15)
    assert ora.token_mixing_shares(zero_w, _t(0.0), xs, 0) == [0.0, 0.0, 0.0]
    cancel = torch.tensor([[1.0, -1.0]], dtype=DT)
    same = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DT)
    assert ora.token_mixing_shares(cancel, None, same, 0) == [0.0, 0.0]


def _vec_mix(w: Tensor, b: Tensor, xs: Tensor, r: Tensor) -> Tensor:
    """Vectorized token-mixing rule: ``xs`` (N, T_in, C), ``r`` (N, T_out) -> (N, T_in)."""
    c = w[None, :, :, None] * xs[:, None, :, :]                # (N, T_out, T_in, C)
    norms = c.norm(dim=-1)
    total = norms.sum(-1, keepdim=True)
    frac = torch.where(total > 0, norms / total.clamp_min(1e-300), 1.0 / w.shape[1])
    y = c.sum(2) + b[None, :, None]
    beta = frac[..., None] * b[None, :, None, None]
    mu = ((c + beta) * y[:, :, None, :]).sum(-1) / (y * y).sum(-1)[..., None]
    return torch.einsum("nts,nt->ns", mu, r)


def test_token_mixing_loop_matches_vectorized() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, dtype=DT, generator=g)
    b = torch.randn(5, dtype=DT, generator=g)
    xs = torch.randn(1, 7, 3, dtype=DT, generator=g)
    r = torch.randn(1, 5, dtype=DT, generator=g)
    loop = torch.zeros(7, dtype=DT)
    for t in range(5):
        for s, m in enumerate(ora.token_mixing_shares(w, b, xs[0], t)):
            loop[s] += m * r[0, t]
    assert float((loop - _vec_mix(w, b, xs, r)[0]).abs().max()) < 1e-12
    assert abs(float(loop.sum() - r.sum())) < 1e-12


# --------------------------------------------------------------------------- vectorized form


def _vec_residual(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    y = a + b
    yy = (y * y).sum(-1)
    return (a * y).sum(-1) / yy * r, (b * y).sum(-1) / yy * r


def _vec_map(model: torch.nn.Module, x: Tensor, target: int) -> Tensor:
    """The whole definition in vectorized form, fed by the model's own tensors (hooks)."""
    mods: dict[str, torch.nn.Module] = {"embed": model.patch_embed, "norm": model.norm}
    for i, blk in enumerate(model.blocks):
        mods[f"{i}"] = blk
        if model.kind == "mixer":
            mods[f"{i}.n1"] = blk.norm1
            mods[f"{i}.act"] = blk.mlp_tokens.act
            mods[f"{i}.m"] = blk.mlp_tokens.fc2
        elif model.kind == "resmlp":
            mods[f"{i}.a1"] = blk.norm1
        else:
            mods[f"{i}.vn"] = blk.sgu.norm_v
            mods[f"{i}.o"] = blk.proj_out
    logits, seen = _capture(model, x, mods)
    normed = seen["norm"][1]
    n_tok = normed.shape[1]
    pooled = normed.mean(1)
    r = (normed / n_tok * pooled[:, None]).sum(-1) / (pooled * pooled).sum(-1)[:, None]
    r = r * logits[:, target, None]
    for i in reversed(range(len(model.blocks))):
        blk = model.blocks[i]
        xin, xout = seen[f"{i}"]
        if model.kind == "gmlp":
            r_x, r_o = _vec_residual(xin, seen[f"{i}.o"][1], r)
            pt = blk.sgu.proj_t
            r = r_x + _vec_mix(pt.weight, pt.bias, seen[f"{i}.vn"][1], r_o)
            continue
        if model.kind == "mixer":
            m = seen[f"{i}.m"][1].transpose(1, 2)
        else:
            m = blk.ls1 * blk.linear_tokens(seen[f"{i}.a1"][1].transpose(1, 2)).transpose(1, 2)
        x1 = xin + m
        r_skip, r_f = _vec_residual(x1, xout - x1, r)
        r_x, r_m = _vec_residual(xin, m, r_skip + r_f)
        if model.kind == "mixer":
            tm = blk.mlp_tokens
            r_act = _vec_mix(tm.fc2.weight, tm.fc2.bias, seen[f"{i}.act"][1].transpose(1, 2),
                             r_m)
            r_n1 = _vec_mix(tm.fc1.weight, tm.fc1.bias, seen[f"{i}.n1"][1], r_act)
        else:
            lt = blk.linear_tokens
            r_n1 = _vec_mix(lt.weight, lt.bias, seen[f"{i}.a1"][1], r_m)
        r = r_x + r_n1
    # patch embedding: unfold the pixels of each patch, bias split by norms
    conv = model.patch_embed
    emb = seen["embed"][1].flatten(2).transpose(1, 2)                      # (N, T, C)
    n, _, h, wd = x.shape
    p = conv.kernel_size[0]
    px = x.reshape(n, 3, h // p, p, wd // p, p)                            # (n, d, r, i, c, j)
    c = torch.einsum("kdij,ndricj->nrcijk", conv.weight, px)
    c = c.reshape(n, n_tok, p * p, -1)                                     # (N, T, P, C)
    norms = c.norm(dim=-1)
    frac = norms / norms.sum(-1, keepdim=True)
    beta = frac[..., None] * conv.bias
    mu = ((c + beta) * emb[:, :, None, :]).sum(-1) / (emb * emb).sum(-1)[..., None]
    rp = (mu * r[:, :, None]).reshape(n, h // p, wd // p, p, p)            # (n, r, c, i, j)
    return rp.permute(0, 1, 3, 2, 4).reshape(n, h, wd).detach()


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("kind", ora.KINDS)
def test_loop_matches_vectorized(kind: str, depth: int) -> None:
    """The oracle's loops equal a vectorized form of the same definition computed from the
    model's own intermediate tensors (depth 0: token mean and patch embedding alone)."""
    model = ora.tiny_mixer_model(kind, seed=8, depth=depth)
    x = ora.tiny_mixer_input(seed=9, n=2)
    with torch.no_grad():
        vec = _vec_map(model, x, 1)
    loop = ora.srd_mixer_oracle(model, x, 1)
    assert _rel(loop, vec) < 1e-10
    assert float((loop - vec).abs().max()) < 1e-12


# --------------------------------------------------------------------------- gMLP's gate


def test_gmlp_gate_relevance_goes_to_v() -> None:
    """The first half of h (u, the gate) gets exactly nothing; v gets all that reached the
    gate's output (summed over the tokens); the map depends on proj_t's weights."""
    model = ora.tiny_mixer_model("gmlp", seed=11)
    x = ora.tiny_mixer_input(seed=12, n=2)
    trace = ora.srd_mixer_oracle_trace(model, x, 2)
    for s in trace:
        assert len(s["gate"]) == 2
        for g in s["gate"]:
            assert g["u"] == [0.0] * ora.TOKENS
            assert abs(sum(g["v"]) - sum(g["g"])) < 1e-12
            assert max(abs(v) for v in g["v"]) > 1e-3
    base = torch.stack([s["pixel"] for s in trace])
    other = copy.deepcopy(model)
    with torch.no_grad():
        w = other.blocks[0].sgu.proj_t.weight
        w.copy_(w + 0.3 * torch.randn(w.shape, dtype=DT,
                                      generator=torch.Generator().manual_seed(1)))
    assert _rel(ora.srd_mixer_oracle(other, x, 2), base) > 1e-2


def test_gmlp_gate_the_other_way_round_is_caught() -> None:
    """The mutation ``gate_to_u`` (u the source, v the gate) conserves the logit too, gives u
    relevance, and changes the map: a map comparison tells the two apart."""
    model = ora.tiny_mixer_model("gmlp", seed=11)
    x = ora.tiny_mixer_input(seed=12, n=2)
    good = ora.srd_mixer_oracle(model, x, 2)
    trace = ora.srd_mixer_oracle_trace(model, x, 2, mutation="gate_to_u")
    bad = torch.stack([s["pixel"] for s in trace])
    for s in trace:
        assert abs(float(s["pixel"].sum()) - float(s["logits"][2])) < 1e-9
        assert s["gate"][0]["v"] == [0.0] * ora.TOKENS
    assert _rel(bad, good) > 1e-2


# --------------------------------------------------------------------------- mutation: bias split


@pytest.mark.parametrize("kind", ora.KINDS)
def test_even_mixing_bias_split_is_caught(kind: str) -> None:
    """Splitting every token-mixing bias evenly instead of by ``||c_{s->t}||`` conserves the
    logit as well, but changes the map by far more than any tolerance of a comparison."""
    model = ora.tiny_mixer_model(kind, seed=13)
    x = ora.tiny_mixer_input(seed=14, n=2)
    good = ora.srd_mixer_oracle(model, x, 0)
    bad = ora.srd_mixer_oracle(model, x, 0, mutation="mixing_bias_even")
    logits = ora.oracle_mixer_logits(model, x)
    assert torch.allclose(bad.sum((1, 2)), logits[:, 0], atol=1e-9, rtol=0)
    assert _rel(bad, good) > 1e-3


def test_even_mixing_bias_split_acts_only_through_the_bias() -> None:
    """With the token-mixing biases zeroed, the mutation gives the same map (so the difference
    above is the bias rule's, not an accident of the flag)."""
    model = ora.tiny_mixer_model("mixer", seed=13)
    with torch.no_grad():
        for blk in model.blocks:
            blk.mlp_tokens.fc1.bias.zero_()
            blk.mlp_tokens.fc2.bias.zero_()
    x = ora.tiny_mixer_input(seed=14, n=2)
    good = ora.srd_mixer_oracle(model, x, 0)
    bad = ora.srd_mixer_oracle(model, x, 0, mutation="mixing_bias_even")
    assert float((good - bad).abs().max()) < 1e-13


def test_unknown_mutation_and_model_rejected() -> None:
    model = ora.tiny_mixer_model("mixer")
    x = ora.tiny_mixer_input(n=1)
    with pytest.raises(ValueError):
        ora.srd_mixer_oracle(model, x, 0, mutation="nope")
    with pytest.raises(ValueError):
        ora.tiny_mixer_model("vit")
    with pytest.raises(TypeError):
        ora.srd_mixer_oracle(torch.nn.Linear(2, 2), x, 0)


# --------------------------------------------------------------------------- non-trivial models


@pytest.mark.parametrize("kind", ora.KINDS)
def test_models_are_non_trivial(kind: str) -> None:
    """Every bias / shift is non-zero and no gain is left at 1; maps are far from zero, have
    both signs, and differ between targets; different seeds give different models."""
    model = ora.tiny_mixer_model(kind, seed=0)
    names = set()
    for name, param in model.named_parameters():
        p = param.detach()
        leaf = name.rsplit(".", 1)[-1]
        names.add(leaf)
        assert float(p.abs().min()) > 0.0, name
        if leaf in ("bias", "beta"):
            assert float(p.abs().mean()) > 0.1, name
        if leaf in ("alpha", "ls1", "ls2") or (leaf == "weight" and p.dim() == 1):
            assert float((p - 1).abs().min()) > 0.0 and float((p - 1).abs().mean()) > 0.05, name
        if leaf.startswith("ls"):
            assert 0.25 < float(p.mean()) < 0.75
    assert "bias" in names
    if kind == "resmlp":
        assert {"alpha", "beta", "ls1", "ls2"} <= names
    assert model.patch_embed.bias is not None
    assert not model.training
    assert all(p.dtype == DT for p in model.parameters())
    x = ora.tiny_mixer_input(seed=1, n=2)
    maps = [ora.srd_mixer_oracle(model, x, c) for c in range(ora.CLASSES)]
    for m in maps:
        assert float(m.abs().sum((1, 2)).min()) > 1e-2
        assert float(m.max()) > 0 > float(m.min())
        assert float((m == 0).double().mean()) < 0.05
    for a in range(ora.CLASSES):
        for b in range(a + 1, ora.CLASSES):
            assert _rel(maps[a], maps[b]) > 1e-2
    other = ora.tiny_mixer_model(kind, seed=1)
    assert float((other.head.weight - model.head.weight).detach().abs().max()) > 1e-3


def test_models_match_plain_torch() -> None:
    """The model classes compute what the brief says (a plain functional re-statement of one
    block of each kind), so the oracle is checked against the intended architectures."""
    x = torch.randn(2, ora.TOKENS, ora.DIM, dtype=DT, generator=torch.Generator().manual_seed(2))
    mix = ora.tiny_mixer_model("mixer", seed=2).blocks[0]
    tm, cm = mix.mlp_tokens, mix.mlp_channels

    def mlp(m: torch.nn.Module, v: Tensor) -> Tensor:
        return F.linear(F.gelu(F.linear(v, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)

    def ln(m: torch.nn.Module, v: Tensor) -> Tensor:
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias

    with torch.no_grad():
        y = x + mlp(tm, ln(mix.norm1, x).transpose(1, 2)).transpose(1, 2)
        y = y + mlp(cm, ln(mix.norm2, y))
        assert float((mix(x) - y).abs().max()) < 1e-12
        assert tm.fc1.weight.shape == (ora.TOKEN_HIDDEN, ora.TOKENS)
        assert cm.fc1.weight.shape == (ora.CHANNEL_HIDDEN, ora.DIM)

        res = ora.tiny_mixer_model("resmlp", seed=2).blocks[0]
        a1 = res.norm1.alpha * x + res.norm1.beta
        y = x + res.ls1 * (a1.transpose(1, 2) @ res.linear_tokens.weight.T
                           + res.linear_tokens.bias).transpose(1, 2)
        y = y + res.ls2 * mlp(res.mlp_channels, res.norm2.alpha * y + res.norm2.beta)
        assert float((res(x) - y).abs().max()) < 1e-12

        gm = ora.tiny_mixer_model("gmlp", seed=2).blocks[0]
        h = F.gelu(F.linear(ln(gm.norm, x), gm.proj_in.weight, gm.proj_in.bias))
        d = ora.GATE_DIM
        u, v = h[..., :d], ln(gm.sgu.norm_v, h[..., d:])
        v = torch.einsum("ts,nsc->ntc", gm.sgu.proj_t.weight, v) \
            + gm.sgu.proj_t.bias[None, :, None]
        y = x + F.linear(u * v, gm.proj_out.weight, gm.proj_out.bias)
        assert float((gm(x) - y).abs().max()) < 1e-12
    assert math.isclose(float(ora.tiny_mixer_input(n=1).std()), 1.0, abs_tol=0.2)
