"""Slow, explicit reference implementation ("oracle") of SRD for the models in small_models.py.

Written straight from docs/srd.md, independently of ``srdxai.engine``:

* The oracle knows each test architecture explicitly: for every model class there is a builder
  that recomputes the forward pass layer by layer (plain module calls, float64), records every
  PFV layer (the model input ``"input"`` and the output of every activation module, named by the
  module's qualified name) and every pre-activation ``z``, and describes each affine block as a
  sum of *branches*; a branch is a chain of linear ops (conv with optional fused BN, max-pool,
  avg-pool) applied to one PFV layer (an empty chain is an identity shortcut).
* For every block output position ``q`` it enumerates every path explicitly (a choice of
  kernel/pool offset in each op of a branch; positions in zero padding are not paths), pushes the
  input PFV ``v(p)`` through the linear parts to get the contribution vector ``c_π(q)``, adds the
  bias shares ``b_π`` (entry-op bias split by the L2 norms of the path contributions measured at
  the entry op's output, even split when all norms are 0; a share is carried downstream with its
  path), and computes ``µ_π = <c_π(q) + b_π(q), z(q)> / ||z(q)||²`` (0 where ``z(q) = 0``).
* Relevance goes down block by block, ``R(p) += µ_π R(q)``; activations are transparent.

No gradients / autograd / modified chain rule are used anywhere here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

try:  # works both when tests/ is a package and when it is only on sys.path
    from . import small_models as sm  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - depends on how pytest imports the tests
    import small_models as sm  # type: ignore[no-redef]

Pos = tuple[int, int]
Target = int | Sequence[int] | torch.Tensor

# Tolerance for the self-check that the sum over all paths (contributions + bias shares)
# reproduces the recorded pre-activation z(q).
_Z_RTOL = 1e-9
_Z_ATOL = 1e-10


# ----------------------------------------------------------------------------------------------
# Linear ops of a branch
# ----------------------------------------------------------------------------------------------


def _window_sources(
    u: Pos,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    in_hw: tuple[int, int],
) -> list[tuple[Pos, Pos]]:
    """All (offset, input position) pairs of a sliding window at output position ``u`` whose input
    position lies inside the (unpadded) input: p = u*stride - pad + k*dilation per axis."""
    out: list[tuple[Pos, Pos]] = []
    for ki in range(kernel[0]):
        pi = u[0] * stride[0] - padding[0] + ki * dilation[0]
        if not 0 <= pi < in_hw[0]:
            continue
        for kj in range(kernel[1]):
            pj = u[1] * stride[1] - padding[1] + kj * dilation[1]
            if not 0 <= pj < in_hw[1]:
                continue
            out.append(((ki, kj), (pi, pj)))
    return out


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    """(v, v) for an int, tuple(v) for a 2-sequence."""
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    assert len(t) == 2
    return (t[0], t[1])


class _Op:
    """One linear op on a branch. ``bias`` is the entry-op bias vector (same at every output
    position) or None when the op adds no bias."""

    bias: torch.Tensor | None = None

    def sources(self, u: Pos) -> list[tuple[Pos, Pos]]:
        """(offset, input position) of every path step into output position ``u``."""
        raise NotImplementedError

    def apply(self, n: int, offset: Pos, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        """Push the vector ``vec`` living at input position ``p`` through this op's linear part
        along kernel/pool offset ``offset`` to output position ``u`` (sample ``n``)."""
        raise NotImplementedError


class _ConvOp(_Op):
    """Conv2d, optionally with the BatchNorm2d that follows it fused in (one entry op).

    Contribution along offset k: ``s ⊙ (W_k v(p))`` with ``W_k`` the dense (Cout, Cin) matrix of
    offset k (block diagonal for grouped convs) and ``s = γ/√(σ²+ε)`` (1 without BN).
    Bias: ``s·b_conv + β − s·µ`` (BN) or ``b_conv`` (no BN) or None (no conv bias and no BN).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, in_hw: tuple[int, int]):
        assert isinstance(conv, nn.Conv2d)
        assert conv.padding_mode == "zeros", "only zero padding is supported"
        w = conv.weight.detach().to(torch.float64)
        cout, cin_g, kh, kw = w.shape
        groups = conv.groups
        cin = cin_g * groups
        cout_g = cout // groups
        self.kernel = (kh, kw)
        self.stride = _pair(conv.stride)
        assert not isinstance(conv.padding, str), "string padding not supported"
        self.padding = _pair(conv.padding)
        self.dilation = _pair(conv.dilation)
        self.in_hw = in_hw
        if bn is not None:
            assert isinstance(bn, nn.BatchNorm2d) and not bn.training
            scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.detach().double() - scale * bn.running_mean.double()
        else:
            scale = torch.ones(cout, dtype=torch.float64)
            shift = None
        self.mats: dict[Pos, torch.Tensor] = {}
        for ki in range(kh):
            for kj in range(kw):
                dense = torch.zeros(cout, cin, dtype=torch.float64)
                for o in range(cout):
                    g = o // cout_g
                    for i_local in range(cin_g):
                        dense[o, g * cin_g + i_local] = w[o, i_local, ki, kj]
                self.mats[(ki, kj)] = scale[:, None] * dense
        conv_b = conv.bias.detach().double() if conv.bias is not None else None
        if shift is not None:
            self.bias = shift + (scale * conv_b if conv_b is not None else 0.0)
        else:
            self.bias = conv_b

    def sources(self, u: Pos) -> list[tuple[Pos, Pos]]:
        return _window_sources(u, self.kernel, self.stride, self.padding, self.dilation, self.in_hw)

    def apply(self, n: int, offset: Pos, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return self.mats[offset] @ vec


class _MaxPoolOp(_Op):
    """MaxPool2d with the arg-max routing recorded from the actual input: the path through pool
    offset k from p to u keeps exactly the channels whose recorded arg-max at u is p."""

    def __init__(self, pool: nn.MaxPool2d, inp: torch.Tensor):
        assert isinstance(pool, nn.MaxPool2d)
        self.kernel = _pair(pool.kernel_size)
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.padding = _pair(pool.padding)
        self.dilation = _pair(pool.dilation)
        self.in_hw = (inp.shape[2], inp.shape[3])
        out, idx = torch.nn.functional.max_pool2d(
            inp,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=pool.ceil_mode,
            return_indices=True,
        )
        self.out = out
        self.indices = idx  # (N, C, Ho, Wo), flat index into the input's H*W

    def sources(self, u: Pos) -> list[tuple[Pos, Pos]]:
        return _window_sources(u, self.kernel, self.stride, self.padding, self.dilation, self.in_hw)

    def apply(self, n: int, offset: Pos, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        flat = p[0] * self.in_hw[1] + p[1]
        mask = (self.indices[n, :, u[0], u[1]] == flat).to(torch.float64)
        return vec * mask


class _AvgPoolOp(_Op):
    """AvgPool2d: every in-bounds window position contributes v(p) / divisor(u)."""

    def __init__(self, pool: nn.AvgPool2d, in_hw: tuple[int, int]):
        assert isinstance(pool, nn.AvgPool2d)
        assert not pool.ceil_mode, "ceil_mode not supported by the oracle"
        self.kernel = _pair(pool.kernel_size)
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.padding = _pair(pool.padding)
        self.in_hw = in_hw
        self.count_include_pad = pool.count_include_pad
        self.divisor_override = pool.divisor_override

    def sources(self, u: Pos) -> list[tuple[Pos, Pos]]:
        return _window_sources(u, self.kernel, self.stride, self.padding, (1, 1), self.in_hw)

    def apply(self, n: int, offset: Pos, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        if self.divisor_override:
            d = float(self.divisor_override)
        elif self.count_include_pad:
            d = float(self.kernel[0] * self.kernel[1])
        else:
            d = float(len(self.sources(u)))
        return vec / d


# ----------------------------------------------------------------------------------------------
# Graph description
# ----------------------------------------------------------------------------------------------


@dataclass
class _Branch:
    """A chain of linear ops applied to the PFV layer ``in_layer`` (no ops = identity)."""

    in_layer: str
    ops: list[_Op] = field(default_factory=list)


@dataclass
class _Block:
    """An affine block: z = sum of its branches' outputs; z feeds the activation ``out_layer``."""

    out_layer: str
    z: torch.Tensor  # recorded pre-activation (N, C, H, W)
    branches: list[_Branch]


@dataclass
class _Graph:
    """PFV layers (name -> (N, C, H, W)), affine blocks in forward order, GAP+Linear head."""

    layers: dict[str, torch.Tensor]
    blocks: list[_Block]
    head_layer: str
    head_weight: torch.Tensor  # (K, C)
    head_bias: torch.Tensor  # (K,)
    logits: torch.Tensor  # (N, K), recomputed


def _hw(t: torch.Tensor) -> tuple[int, int]:
    return (int(t.shape[2]), int(t.shape[3]))


def _head(
    m: nn.Module, fc: nn.Linear, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, bias, logits) of a GAP + Linear head on the last PFV layer v."""
    w = fc.weight.detach().double()
    b = (
        fc.bias.detach().double()
        if fc.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64)
    )
    logits = fc(torch.flatten(v.mean(dim=(2, 3), keepdim=True), 1))
    return w, b, logits


def _graph_plainnet(m: sm.PlainNet, x: torch.Tensor) -> _Graph:
    z1 = m.conv1(x)
    a1 = m.act1(z1)
    z2 = m.bn2(m.conv2(a1))
    a2 = m.act2(z2)
    w, b, logits = _head(m, m.fc, a2)
    return _Graph(
        layers={"input": x, "act1": a1, "act2": a2},
        blocks=[
            _Block("act1", z1, [_Branch("input", [_ConvOp(m.conv1, None, _hw(x))])]),
            _Block("act2", z2, [_Branch("act1", [_ConvOp(m.conv2, m.bn2, _hw(a1))])]),
        ],
        head_layer="act2",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


def _graph_poolnet(m: sm.PoolNet, x: torch.Tensor) -> _Graph:
    z1 = m.bn1(m.conv1(x))
    a1 = m.act1(z1)
    mp1 = _MaxPoolOp(m.pool1, a1)
    p1 = m.pool1(a1)
    assert torch.equal(p1, mp1.out)
    z2 = m.bn2(m.conv2(p1))
    a2 = m.act2(z2)
    z3 = m.conv3(a2)
    a3 = m.act3(z3)
    mp2 = _MaxPoolOp(m.pool2, a3)
    p2 = m.pool2(a3)
    assert torch.equal(p2, mp2.out)
    z4 = m.conv4(p2)
    a4 = m.act4(z4)
    w, b, logits = _head(m, m.fc, a4)
    return _Graph(
        layers={"input": x, "act1": a1, "act2": a2, "act3": a3, "act4": a4},
        blocks=[
            _Block("act1", z1, [_Branch("input", [_ConvOp(m.conv1, m.bn1, _hw(x))])]),
            _Block("act2", z2, [_Branch("act1", [mp1, _ConvOp(m.conv2, m.bn2, _hw(p1))])]),
            _Block("act3", z3, [_Branch("act2", [_ConvOp(m.conv3, None, _hw(a2))])]),
            _Block("act4", z4, [_Branch("act3", [mp2, _ConvOp(m.conv4, None, _hw(p2))])]),
        ],
        head_layer="act4",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


def _graph_resnetlike(m: sm.ResNetLike, x: torch.Tensor) -> _Graph:
    z0 = m.bn1(m.conv1(x))
    a0 = m.act(z0)
    l1 = m.layer1
    z11 = l1.bn1(l1.conv1(a0))
    a11 = l1.act1(z11)
    z12 = l1.bn2(l1.conv2(a11))
    a12 = l1.act2(z12)
    z13 = l1.bn3(l1.conv3(a12)) + a0
    a13 = l1.act3(z13)
    l2 = m.layer2
    sc = l2.downsample[1](l2.downsample[0](a13))
    z21 = l2.bn1(l2.conv1(a13))
    a21 = l2.act1(z21)
    z22 = l2.bn2(l2.conv2(a21))
    a22 = l2.act2(z22)
    z23 = l2.bn3(l2.conv3(a22)) + sc
    a23 = l2.act3(z23)
    w, b, logits = _head(m, m.fc, a23)
    return _Graph(
        layers={
            "input": x,
            "act": a0,
            "layer1.act1": a11,
            "layer1.act2": a12,
            "layer1.act3": a13,
            "layer2.act1": a21,
            "layer2.act2": a22,
            "layer2.act3": a23,
        },
        blocks=[
            _Block("act", z0, [_Branch("input", [_ConvOp(m.conv1, m.bn1, _hw(x))])]),
            _Block("layer1.act1", z11, [_Branch("act", [_ConvOp(l1.conv1, l1.bn1, _hw(a0))])]),
            _Block(
                "layer1.act2", z12, [_Branch("layer1.act1", [_ConvOp(l1.conv2, l1.bn2, _hw(a11))])]
            ),
            _Block(
                "layer1.act3",
                z13,
                [
                    _Branch("layer1.act2", [_ConvOp(l1.conv3, l1.bn3, _hw(a12))]),
                    _Branch("act", []),  # identity shortcut: no bias
                ],
            ),
            _Block(
                "layer2.act1", z21, [_Branch("layer1.act3", [_ConvOp(l2.conv1, l2.bn1, _hw(a13))])]
            ),
            _Block(
                "layer2.act2", z22, [_Branch("layer2.act1", [_ConvOp(l2.conv2, l2.bn2, _hw(a21))])]
            ),
            _Block(
                "layer2.act3",
                z23,
                [
                    _Branch("layer2.act2", [_ConvOp(l2.conv3, l2.bn3, _hw(a22))]),
                    _Branch(
                        "layer1.act3",
                        [_ConvOp(l2.downsample[0], l2.downsample[1], _hw(a13))],
                    ),
                ],
            ),
        ],
        head_layer="layer2.act3",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


def _graph_depthwisenet(m: sm.DepthwiseNet, x: torch.Tensor) -> _Graph:
    z1 = m.bn1(m.conv1(x))
    a1 = m.act1(z1)
    z2 = m.bn2(m.conv2(a1))
    a2 = m.act2(z2)
    z3 = m.bn3(m.conv3(a2))
    a3 = m.act3(z3)
    w, b, logits = _head(m, m.fc, a3)
    return _Graph(
        layers={"input": x, "act1": a1, "act2": a2, "act3": a3},
        blocks=[
            _Block("act1", z1, [_Branch("input", [_ConvOp(m.conv1, m.bn1, _hw(x))])]),
            _Block("act2", z2, [_Branch("act1", [_ConvOp(m.conv2, m.bn2, _hw(a1))])]),
            _Block("act3", z3, [_Branch("act2", [_ConvOp(m.conv3, m.bn3, _hw(a2))])]),
        ],
        head_layer="act3",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


def _graph_avgpoolnet(m: sm.AvgPoolNet, x: torch.Tensor) -> _Graph:
    z1 = m.conv1(x)
    a1 = m.act1(z1)
    p1 = m.pool1(a1)
    z2 = m.bn2(m.conv2(p1))
    a2 = m.act2(z2)
    w, b, logits = _head(m, m.fc, a2)
    return _Graph(
        layers={"input": x, "act1": a1, "act2": a2},
        blocks=[
            _Block("act1", z1, [_Branch("input", [_ConvOp(m.conv1, None, _hw(x))])]),
            _Block(
                "act2",
                z2,
                [_Branch("act1", [_AvgPoolOp(m.pool1, _hw(a1)), _ConvOp(m.conv2, m.bn2, _hw(p1))])],
            ),
        ],
        head_layer="act2",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


def _graph_tinyconvnet(m: sm.TinyConvNet, x: torch.Tensor) -> _Graph:
    z1 = m.conv(x)
    a1 = m.act(z1)
    w, b, logits = _head(m, m.fc, a1)
    return _Graph(
        layers={"input": x, "act": a1},
        blocks=[_Block("act", z1, [_Branch("input", [_ConvOp(m.conv, None, _hw(x))])])],
        head_layer="act",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


def _graph_tinypoolnet(m: sm.TinyPoolNet, x: torch.Tensor) -> _Graph:
    mp = _MaxPoolOp(m.pool, x)
    p = m.pool(x)
    assert torch.equal(p, mp.out)
    z1 = m.conv(p)
    a1 = m.act(z1)
    w, b, logits = _head(m, m.fc, a1)
    return _Graph(
        layers={"input": x, "act": a1},
        blocks=[_Block("act", z1, [_Branch("input", [mp, _ConvOp(m.conv, None, _hw(p))])])],
        head_layer="act",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


def _graph_tinyresnet(m: sm.TinyResNet, x: torch.Tensor) -> _Graph:
    z1 = m.conv(x) + x
    a1 = m.act(z1)
    w, b, logits = _head(m, m.fc, a1)
    return _Graph(
        layers={"input": x, "act": a1},
        blocks=[
            _Block(
                "act",
                z1,
                [_Branch("input", [_ConvOp(m.conv, None, _hw(x))]), _Branch("input", [])],
            )
        ],
        head_layer="act",
        head_weight=w,
        head_bias=b,
        logits=logits,
    )


_BUILDERS: dict[type, Callable[[nn.Module, torch.Tensor], _Graph]] = {
    sm.PlainNet: _graph_plainnet,
    sm.PoolNet: _graph_poolnet,
    sm.ResNetLike: _graph_resnetlike,
    sm.DepthwiseNet: _graph_depthwisenet,
    sm.AvgPoolNet: _graph_avgpoolnet,
    sm.TinyConvNet: _graph_tinyconvnet,
    sm.TinyPoolNet: _graph_tinypoolnet,
    sm.TinyResNet: _graph_tinyresnet,
}


@torch.no_grad()
def _build_graph(model: nn.Module, x: torch.Tensor) -> _Graph:
    """Record the forward pass of (a float64 eval copy of) ``model`` on ``x`` and describe it."""
    builder = _BUILDERS.get(type(model))
    if builder is None:
        raise TypeError(f"srd_oracle knows no architecture description for {type(model).__name__}")
    m = copy.deepcopy(model).double().eval()
    xd = x.detach().to(torch.float64)
    g = builder(m, xd)
    ref = m(xd)
    if not torch.allclose(g.logits, ref, rtol=1e-12, atol=1e-12):
        raise AssertionError("oracle graph description does not reproduce the model's logits")
    return g


# ----------------------------------------------------------------------------------------------
# Paths, bias shares, relevance
# ----------------------------------------------------------------------------------------------

# A path step: (offset, input position, output position) of one op.
_Step = tuple[Pos, Pos, Pos]
# A path (or path prefix) from the branch's input: (start position p, steps in forward order).
_Path = tuple[Pos, tuple[_Step, ...]]


def _enumerate_paths(ops: Sequence[_Op], q: Pos) -> list[_Path]:
    """Every path through the op chain ``ops`` ending at output position ``q`` (paths through
    padding are not paths). An empty chain has the single path (q, ())."""
    partial: list[_Path] = [(q, ())]
    for op in reversed(ops):
        nxt: list[_Path] = []
        for u, steps in partial:
            for off, p in op.sources(u):
                nxt.append((p, ((off, p, u),) + steps))
        partial = nxt
    return partial


def _contribution(
    branch: _Branch, ops: Sequence[_Op], layers: dict[str, torch.Tensor], n: int, path: _Path
) -> torch.Tensor:
    """c_π: the input PFV v(p) pushed through the linear parts of ``ops`` along ``path``."""
    p0, steps = path
    c = layers[branch.in_layer][n, :, p0[0], p0[1]]
    for op, (off, pin, pout) in zip(ops, steps, strict=True):
        c = op.apply(n, off, pin, pout, c)
    return c


class _ShareCache:
    """Bias shares b_π(r) per (branch, entry-op index, sample, entry-op output position r)."""

    def __init__(self, layers: dict[str, torch.Tensor]):
        self.layers = layers
        self.cache: dict[tuple[int, int, int, Pos], dict[_Path, torch.Tensor]] = {}

    def shares(self, branch: _Branch, i: int, n: int, r: Pos) -> dict[_Path, torch.Tensor]:
        """Split the bias of op ``i`` at its output position ``r`` over every path prefix that
        reaches r through ops[0..i]: proportional to ||c_π(r)|| (contribution measured at the
        entry op's output, earlier biases excluded); evenly when all norms are 0."""
        key = (id(branch), i, n, r)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        op = branch.ops[i]
        assert op.bias is not None
        prefix_ops = branch.ops[: i + 1]
        prefixes = _enumerate_paths(prefix_ops, r)
        if not prefixes:
            raise AssertionError("a bias entry position is reached by no path; bias would be lost")
        norms = [
            float(torch.linalg.vector_norm(_contribution(branch, prefix_ops, self.layers, n, pr)))
            for pr in prefixes
        ]
        total = math.fsum(norms)
        out: dict[_Path, torch.Tensor] = {}
        for pr, nm in zip(prefixes, norms, strict=True):
            frac = nm / total if total > 0.0 else 1.0 / len(prefixes)
            out[pr] = op.bias * frac
        self.cache[key] = out
        return out


def _path_vector(
    branch: _Branch, layers: dict[str, torch.Tensor], shares: _ShareCache, n: int, path: _Path
) -> torch.Tensor:
    """c_π(q) + b_π(q) for a full path of ``branch``: the contribution plus every bias share the
    path picked up at an entry op on the way, carried through the later ops' linear parts."""
    p0, steps = path
    c = layers[branch.in_layer][n, :, p0[0], p0[1]]
    b: torch.Tensor | None = None
    for i, (op, (off, pin, pout)) in enumerate(zip(branch.ops, steps, strict=True)):
        c = op.apply(n, off, pin, pout, c)
        if b is not None:
            b = op.apply(n, off, pin, pout, b)
        if op.bias is not None:
            s = shares.shares(branch, i, n, pout)[(p0, steps[: i + 1])]
            b = s if b is None else b + s
    return c if b is None else c + b


def _propagate(g: _Graph, relevance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Share relevance down through every affine block (reverse forward order).

    ``relevance`` maps PFV layer names to (N, H, W) seeds (missing layers start at 0). For each
    block, sample n and output position q with R(q) != 0, every path π from an input position p
    gives p the amount µ_π R(q), µ_π = <c_π(q)+b_π(q), z(q)>/||z(q)||² (0 where z(q) = 0). The
    activation is transparent, so a block's output relevance is its activation's PFV relevance.
    Returns the relevance of every PFV layer."""
    R = {
        name: torch.zeros(t.shape[0], t.shape[2], t.shape[3], dtype=torch.float64)
        for name, t in g.layers.items()
    }
    for name, seed in relevance.items():
        R[name] = R[name] + seed
    shares = _ShareCache(g.layers)
    for block in reversed(g.blocks):
        r_out = R[block.out_layer]
        nb, _, ho, wo = block.z.shape
        for n in range(nb):
            for qi in range(ho):
                for qj in range(wo):
                    rq = float(r_out[n, qi, qj])
                    if rq == 0.0:
                        continue
                    q = (qi, qj)
                    items: list[tuple[str, Pos, torch.Tensor]] = []
                    for br in block.branches:
                        for path in _enumerate_paths(br.ops, q):
                            items.append(
                                (br.in_layer, path[0], _path_vector(br, g.layers, shares, n, path))
                            )
                    zq = block.z[n, :, qi, qj]
                    zsum = torch.stack([v for _, _, v in items]).sum(0)
                    if not torch.allclose(zsum, zq, rtol=_Z_RTOL, atol=_Z_ATOL):
                        raise AssertionError(
                            f"paths do not add up to z at block {block.out_layer}, n={n}, q={q}: "
                            f"{zsum.tolist()} vs {zq.tolist()}"
                        )
                    zz = float(zq @ zq)
                    if zz == 0.0:
                        continue
                    for layer, p, vec in items:
                        mu = float(vec @ zq) / zz
                        R[layer][n, p[0], p[1]] += mu * rq
    return R


def _targets(target: Target, n: int) -> torch.Tensor:
    """Per-sample target classes as a LongTensor (N,)."""
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long)
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        return t.expand(n).clone()
    assert t.numel() == n, "target must be an int or have one entry per sample"
    return t


def _contrast(seed: torch.Tensor) -> torch.Tensor:
    """Seed map minus its own spatial mean, per sample."""
    return seed - seed.mean(dim=(1, 2), keepdim=True)


def srd_logit_seed(model: nn.Module, x: torch.Tensor, target: Target) -> tuple[str, torch.Tensor]:
    """(last PFV layer name, (N, h, w) logit seed): each position q of the last PFV layer gets
    (w_c · v(q) + b_c) / n with n = h*w (GAP + Linear head, bias split evenly); it sums to the
    target logit per sample."""
    g = _build_graph(model, x)
    return g.head_layer, _logit_seed(g, target)


def _logit_seed(g: _Graph, target: Target) -> torch.Tensor:
    v = g.layers[g.head_layer]
    t = _targets(target, v.shape[0])
    w = g.head_weight[t]  # (N, C)
    b = g.head_bias[t]  # (N,)
    n_pos = v.shape[2] * v.shape[3]
    return (torch.einsum("nc,nchw->nhw", w, v) + b[:, None, None]) / n_pos


def srd_oracle(
    model: nn.Module, x: torch.Tensor, target: Target, *, contrastive: bool = False
) -> torch.Tensor:
    """SRD pixel map (N, H, W), float64, with the ``logit`` seed, computed path by path.

    ``model``: an instance of a class in small_models.py (a float64 eval-mode copy is used).
    ``target``: an int (every sample) or one class per sample. With ``contrastive=True`` the seed
    map (the last PFV layer's logit shares) has its per-sample spatial mean subtracted first.
    Without it the map sums to the target logit per sample (conservation)."""
    g = _build_graph(model, x)
    seed = _logit_seed(g, target)
    if contrastive:
        seed = _contrast(seed)
    return _propagate(g, {g.head_layer: seed})["input"]


def srd_oracle_layer_seed(
    model: nn.Module,
    x: torch.Tensor,
    layer_name: str,
    seed_map: torch.Tensor,
    *,
    contrastive: bool = False,
) -> torch.Tensor:
    """SRD pixel map (N, H, W), float64, when the PFVs of the activation module ``layer_name``
    (its qualified module name, or ``"input"``) are seeded with ``seed_map`` (N, h, w) and the
    relevance is shared down to the input. A one-hot seed at q0 gives the ERF of v(q0).
    ``contrastive=True`` subtracts the seed's per-sample spatial mean first."""
    g = _build_graph(model, x)
    if layer_name not in g.layers:
        raise KeyError(f"{layer_name!r} is not a PFV layer; known: {sorted(g.layers)}")
    t = g.layers[layer_name]
    seed = torch.as_tensor(seed_map).to(torch.float64)
    expected = (t.shape[0], t.shape[2], t.shape[3])
    if tuple(seed.shape) != expected:
        raise ValueError(
            f"seed_map shape {tuple(seed.shape)} != {expected} of layer {layer_name!r}"
        )
    if contrastive:
        seed = _contrast(seed)
    return _propagate(g, {layer_name: seed})["input"]


def pfv_layer_names(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """PFV layer name -> (C, h, w) of every PFV layer the oracle knows for ``model`` on ``x``."""
    g = _build_graph(model, x)
    return {k: (int(v.shape[1]), int(v.shape[2]), int(v.shape[3])) for k, v in g.layers.items()}


# The pieces other oracles in tests/ build on (the conv + BatchNorm entry op of a path, the
# per-sample targets, the contrastive seed), under public names.
ConvEntryOp = _ConvOp
per_sample_targets = _targets
contrast_seed = _contrast
