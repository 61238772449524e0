"""The attribution engine: model guard, traced forward pass, rules, targets.

A method supplies a :class:`Rule` (what replaces an activation's backward, and optionally what
happens to biases); the engine runs the forward pass under the :class:`~.graph.Recorder`,
resolves targets, and undoes every change to the user's model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import (
    InvalidInputError,
    InvalidTargetError,
    NonFiniteError,
    UnsupportedOperationError,
)
from . import ops
from .catalogue import check_output
from .gradmode import building_graph
from .gradmode import differentiable as differentiable  # re-exported: the engine's API
from .gradmode import is_differentiable as is_differentiable
from .gradmode import keep_graph as keep_graph
from .graph import Node, Recorder

Tensor = torch.Tensor
Target = int | Sequence[int] | Tensor | Callable[[Tensor], Tensor] | None


# --- the model guard -----------------------------------------------------------------------

#: the hook dictionaries of an ``nn.Module`` (instance attributes) the guard restores
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters; restore everything afterwards.

    Restored on success and on exceptions: every module's train/eval flag, every parameter's
    ``requires_grad``, and the module hook dictionaries (hooks the engine adds are removed even
    if the caller's code raised in between). Only what differs is written (a metric call on a
    small CNN spent 0.2 ms here setting every flag twice).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    modules = list(model.modules())
    training = [m.training for m in modules]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    hooks = [(m, name, dict(vars(m)[name])) for m in modules for name in _HOOK_DICTS
             if name in vars(m)]
    try:
        if any(training):
            model.eval()
        for p, flag in requires:
            if flag:
                p.requires_grad_(False)
        yield model
    finally:
        for m, flag in zip(modules, training, strict=True):
            if m.training != flag:
                m.training = flag
        for m, name, content in hooks:
            current = getattr(m, name)
            if current != content:
                current.clear()
                current.update(content)
        for p, flag in requires:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


# --- rules -----------------------------------------------------------------------------------

class Rule:
    """What a method changes in the backward pass. The default is the plain gradient.

    ``plain`` (set by :meth:`to_gradient`): every replaced backward is the true gradient
    again; rules must honour it in every backward function and tensor hook they install.
    """

    plain = False

    def to_gradient(self) -> None:
        """From now on the recorded graph differentiates as the unmodified model (see
        :func:`differentiable`)."""
        self.plain = True

    def activation_backward(
        self, node: Node, z: Tensor, v: Tensor, grad: Tensor, fn: Callable[[Tensor], Tensor]
    ) -> Tensor:
        return true_activation_gradient(z, grad, fn)

    def on_bias_op(self, op: ops.LinearOp, out: Tensor) -> Tensor:
        return out

    def on_linear_op(self, op: ops.LinearOp, inputs: list[Tensor | None], out: Tensor) -> Tensor:
        """Called for every recorded linear operation with its input tensors (None for
        constants) and output, before the output is registered; return the tensor downstream
        code should see (e.g. ``out`` wrapped in an autograd function with a modified backward,
        as LRP's layer rules need). Only called when ``wants_linear_ops`` is True."""
        return out

    def on_opaque(self, op: ops.OpaqueOp, out: Tensor) -> None:
        """Called for each operation the engine cannot decompose (plain gradients are fine)."""

    wants_bias_ops = False
    wants_linear_ops = False
    #: a product of two input-dependent tensors where one is a gate (squeeze-excitation,
    #: ``z * sigmoid(z)``) is recorded as a linear op of the signal with the gate a constant
    #: weight, and the rule's backward gives the gate nothing (docs/srd.md); False: such
    #: products are not decomposed (the plain gradient flows through them)
    gate_products = False
    #: LayerNorm and GroupNorm are recorded as pointwise affine maps with their statistics
    #: constant, and the rule's backward treats them so (docs/srd.md); False: they are not
    #: decomposed (the plain gradient flows through them)
    constant_statistics = False
    #: the output of every sum of two input-dependent tensors is a PFV layer too, with the
    #: identity as its activation (SRD: a residual stream without activations, docs/srd.md)
    sum_layers = False
    keeps_pfv_values = False  # the rule reads PFV values after the forward pass
    needs_graph = True  # False: nothing is replaced, run the model as it is (fastest)


class PlainGradientRule(Rule):
    """The true gradient, with no recording at all: the model runs exactly as written."""

    needs_graph = False


def true_activation_gradient(z: Tensor, grad: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """The ordinary chain rule through an elementwise activation.

    Inside a backward pass run with ``create_graph=True`` (grad mode on) the result stays
    differentiable with respect to ``z`` and ``grad``.
    """
    if building_graph(z, grad):
        zz = z.view_as(z) if z.requires_grad else z.detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(fn(zz), zz, grad, create_graph=True)
        return gz
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(fn(zz), zz, grad)
    return gz


class _Slot:
    """Filled with the activation's graph node once the recorder has created it."""

    __slots__ = ("node",)

    def __init__(self) -> None:
        self.node: Node | None = None


class RuleActivation(torch.autograd.Function):
    """An elementwise activation whose backward is the active rule's."""

    @staticmethod
    def forward(ctx, z, fn, rule, slot):  # type: ignore[override]
        v = fn(z)
        if rule.keeps_pfv_values:
            ctx.save_for_backward(z, v)
        else:
            ctx.save_for_backward(z)
        ctx.fn, ctx.rule, ctx.slot = fn, rule, slot
        return v

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved = ctx.saved_tensors
        z, v = saved if len(saved) == 2 else (saved[0], None)
        if ctx.rule.plain:
            return true_activation_gradient(z, grad, ctx.fn), None, None, None
        return ctx.rule.activation_backward(ctx.slot.node, z, v, grad, ctx.fn), None, None, None


class GateProduct(torch.autograd.Function):
    """``signal * gate`` whose backward sends nothing to the gate while the rule is not plain
    (the gate is a constant weight for the rule; the true product rule otherwise)."""

    @staticmethod
    def forward(ctx, signal, gate, rule):  # type: ignore[override]
        ctx.save_for_backward(signal, gate)
        ctx.rule = rule
        return signal * gate

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        signal, gate = ctx.saved_tensors
        g_signal = (grad * gate).sum_to_size(signal.shape)
        g_gate = (grad * signal).sum_to_size(gate.shape) if ctx.rule.plain else None
        return g_signal, g_gate, None


class ConstantStatisticsNorm(torch.autograd.Function):
    """A LayerNorm / GroupNorm ``fn(x)`` whose backward is ``grad * scale`` (its statistics
    constant) while the rule is not plain, and the true Jacobian otherwise. ``scale`` comes
    from the undetached input inside :func:`differentiable`, so a differentiable map still
    depends on the statistics."""

    @staticmethod
    def forward(ctx, x, scale, fn, rule):  # type: ignore[override]
        ctx.save_for_backward(x, scale)
        ctx.fn, ctx.rule = fn, rule
        return fn(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        if ctx.rule.plain:
            return true_activation_gradient(x, grad, ctx.fn), None, None, None
        return (grad * scale).sum_to_size(x.shape), None, None, None


# --- the traced forward pass -----------------------------------------------------------------

class Trace:
    """One forward pass of ``model`` on ``x`` recorded under ``rule``.

    Attributes after :meth:`forward`: ``output`` (the model output), ``recorder`` (graph),
    ``pfv_layers`` (PFV nodes in forward order, the input first), ``head_ops`` (linear ops
    between the last PFV layers and the output), ``module_outputs`` (module name -> node).
    """

    def __init__(self, model: nn.Module, x: Tensor, rule: Rule,
                 on_activation: Callable[[int, str, Tensor], Tensor | None] | None = None):
        """``on_activation(index, name, value)``: called with every activation output in
        forward order (``index`` 0 is ``pfv_layers[1]``, the first layer after the input);
        returning a tensor of the same shape replaces that output for everything downstream
        (Ablation-CAM's ablated channels), None keeps it."""
        self.model = model
        self.x = x
        self.rule = rule
        self.on_activation = on_activation
        self.output: Tensor | None = None
        self.module_outputs: dict[str, Node] = {}
        self.block_outputs: set[int] = set()  # PFV layers that end a container module

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Break the reference cycles between the recorded graph and autograd's.

        Autograd nodes hold our activation contexts, which hold graph nodes, which hold
        tensors whose ``grad_fn`` leads back to those autograd nodes. Python's garbage collector
        cannot see the C++ edges of that cycle, so without this every call would leak its
        activations (~0.8 GB per ResNet50 batch of 8).
        """
        if is_differentiable():
            # the map the method returns keeps this graph: from now on it must
            # differentiate as the model does (see ``differentiable``)
            self.rule.to_gradient()
        for slot in getattr(self, "_slots", ()):
            slot.node = None
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            for node in recorder.order:
                node.tensor = node.pre = None
                node.producer = None
                node.consumers = []
            recorder.forget_all()
            recorder.order.clear()
            # the recorder's callbacks close over this trace: drop the recorder so that the
            # two do not hold each other (and the input) until a full garbage collection
            self.recorder = None
        self._slots = []
        self.module_outputs.clear()
        self.output = None
        self.head_ops, self.head_sources, self.pfv_layers = set(), [], []
        if getattr(self.rule, "trace", None) is self:
            self.rule.trace = None

    def forward(self) -> Tensor:
        if not self.rule.needs_graph:
            return self._plain_forward()
        slots: list[_Slot] = []
        self._slots = slots

        def activation_apply(z: Tensor, fn: Callable[[Tensor], Tensor], name: str) -> Tensor:
            slot = _Slot()
            slots.append(slot)
            v = RuleActivation.apply(z, fn, self.rule, slot)
            if self.on_activation is not None:
                replacement = self.on_activation(len(slots) - 1, name, v)
                if replacement is not None:
                    if replacement.shape != v.shape:
                        raise InvalidInputError(
                            f"on_activation returned shape {tuple(replacement.shape)} for the "
                            f"activation '{name}' of shape {tuple(v.shape)}.")
                    v = replacement.to(dtype=v.dtype)
            return v

        recorder = Recorder(
            self.x,
            activation_apply,
            on_bias_op=self.rule.on_bias_op if self.rule.wants_bias_ops else None,
            on_opaque=self.rule.on_opaque,
            keep_pfv_values=self.rule.keeps_pfv_values,
            on_linear_op=self.rule.on_linear_op if self.rule.wants_linear_ops else None,
            gate_apply=(lambda signal, gate: GateProduct.apply(signal, gate, self.rule))
            if self.rule.gate_products else None,
            norm_apply=(lambda x, scale, fn: ConstantStatisticsNorm.apply(x, scale, fn,
                                                                          self.rule))
            if self.rule.constant_statistics else None,
            sum_layers=self.rule.sum_layers,
        )
        self.recorder = recorder

        def on_output(name: str, module: nn.Module, output: Any) -> None:
            if isinstance(output, Tensor):
                node = recorder.node_of(recorder.resolve(output))
                if node is not None and node.is_pfv:
                    self.module_outputs[name] = node
                    if any(True for _ in module.children()):
                        self.block_outputs.add(node.index)

        out = recorder.run(self.model, self.x, on_output)
        pfv = [n for n in recorder.order if n.is_pfv]
        # Activation outputs were created before their node existed: connect the slots.
        for slot, node in zip(slots, pfv[1:], strict=True):
            slot.node = node
        self._name_layers(pfv)
        self.pfv_layers = pfv
        out_node = recorder.node_of(out)
        self.output = out
        self.output_node = out_node
        self.head_ops, self.head_sources = self._head(out_node)
        return out

    def _plain_forward(self) -> Tensor:
        # a copy that is not a leaf: a model that edits its input in place (``x.add_``) would
        # otherwise fail on the leaf that requires grad (the gradient flows through the copy)
        out = check_output(self.model(self.x.clone()))
        if self.x.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
            raise UnsupportedOperationError(
                "the model output does not depend on the input through autograd (the forward "
                "detaches it, runs under torch.no_grad() or converts it to numpy): there is no "
                "gradient to explain. Occlusion needs none.")
        self.output = out
        self.pfv_layers, self.head_ops, self.head_sources = [], set(), []
        return out

    @staticmethod
    def _name_layers(pfv: list[Node]) -> None:
        counts: dict[str, int] = {}
        for node in pfv:
            counts[node.name] = counts.get(node.name, 0) + 1
        seen: dict[str, int] = {}
        for node in pfv:
            if counts[node.name] > 1:
                k = seen.get(node.name, 0)
                seen[node.name] = k + 1
                node.name = f"{node.name}@{k}"

    def _walk(self, start: Node, through_activations: bool):
        """Every node from ``start`` back towards the input, each once: through the
        producers' inputs, and through activations to their pre-activations if asked (else
        PFV nodes end the walk)."""
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            if node.is_pfv:
                if through_activations and node.pre is not None:
                    pre = self.recorder.node_of(node.pre)
                    if pre is not None:
                        stack.append(pre)
                continue
            stack.extend(n for n in node.producer.inputs if n is not None)

    def _head(self, out_node: Node) -> tuple[set[ops.LinearOp], list[Node]]:
        nodes = list(self._walk(out_node, through_activations=False))
        return ({n.producer for n in nodes if not n.is_pfv},
                [n for n in nodes if n.is_pfv])

    def opaque_on_paths(self) -> list[ops.OpaqueOp]:
        """The undecomposed operations on some path from the input to the output (through
        activations too), in forward order; an opaque op off every such path gets no
        backward signal and does not matter."""
        found = [n.producer for n in self._walk(self.output_node, through_activations=True)
                 if not n.is_pfv and n.producer.kind == "opaque"]
        return sorted(found, key=lambda op: op.output.index)

    # -- layer lookup ---------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [n.name for n in self.pfv_layers]

    def find_layer(self, name: str) -> Node:
        for node in self.pfv_layers:
            if node.name == name:
                return node
        if name in self.module_outputs:
            return self.module_outputs[name]
        # 'low' / 'high' are feature maps laid out like the input: (N, C, H, W) for images,
        # not a hybrid model's (N, tokens, dim) activations (LeViT's MLPs)
        ndim = len(self.pfv_layers[0].shape) if self.pfv_layers else 0
        spatial = [n for n in self.pfv_layers[1:] if len(n.spatial) > 0 and len(n.shape) == ndim]
        if name in ("low", "high") and spatial:
            low = spatial[-1]
            if name == "low":
                return low
            # 'high': one resolution step finer than 'low'; prefer the output of a block (e.g.
            # ResNet's layer3 rather than the first 1x1 conv of layer4.0, which also sits at
            # that resolution).
            bigger = [n for n in spatial if _positions(n) > _positions(low)]
            if not bigger:
                return low
            level = [n for n in bigger if n.spatial == bigger[-1].spatial]
            blocks = [n for n in level if n.index in self.block_outputs]
            return (blocks or level)[-1]
        available = ", ".join(self.layer_names()[:40])
        if name in ("low", "high"):
            raise InvalidInputError(
                f"layer '{name}': the model has no activation laid out like its input "
                f"({ndim}-D with the input's spatial axes), so there is no feature map for SRD "
                "(or a CAM) to start from: a recurrent model (an LSTM) applies its activations "
                "to one step at a time. Pass layer= one of its activation outputs "
                f"({available}{' ...' if len(self.pfv_layers) > 40 else ''}), or explain it "
                "with a gradient, occlusion or an LRP method.")
        raise InvalidInputError(
            f"unknown layer '{name}'. SRD layers are activation outputs; this model has: "
            f"{available}{' ...' if len(self.pfv_layers) > 40 else ''} (module names whose "
            "output is an activation output also work, and 'low' / 'high').")


def _positions(node: Node) -> int:
    n = 1
    for s in node.spatial:
        n *= s
    return n


# --- inputs and targets ----------------------------------------------------------------------

def check_inputs(x: Any, model: nn.Module | None = None) -> Tensor:
    """Validate the batch to explain: a float tensor (N, C, *spatial), finite."""
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"inputs must be a torch.Tensor, got {type(x).__name__}.")
    if x.layout != torch.strided:
        raise InvalidInputError(
            f"inputs must be a dense tensor, got layout {x.layout}; call x.to_dense().")
    if x.device.type == "meta":
        raise InvalidInputError("inputs are on the meta device (shapes without values); "
                                "explain real tensors.")
    if x.dim() < 3:
        raise InvalidInputError(
            f"inputs must have shape (batch, channels, height, width) (or (batch, channels, "
            f"length)); got {tuple(x.shape)}. Add a batch dimension with x.unsqueeze(0).")
    if not x.is_floating_point():
        raise InvalidInputError(f"inputs must be floating point, got {x.dtype}.")
    if x.shape[0] == 0:
        raise InvalidInputError("inputs hold an empty batch.")
    if x.numel() == 0:
        raise InvalidInputError(f"inputs of shape {tuple(x.shape)} hold no values (a zero-size "
                                "channel or spatial dimension).")
    bad = non_finite_samples(x)
    if bad:
        raise InvalidInputError(f"inputs contain NaN or Inf (samples {bad}); clean them first.")
    if model is not None:
        p = next(model.parameters(), None)
        if p is not None and (p.device != x.device or p.dtype != x.dtype):
            raise InvalidInputError(
                f"inputs are {x.dtype} on {x.device} but the model's parameters are {p.dtype} "
                f"on {p.device}; move one of them (e.g. x.to(next(model.parameters())))")
    return x


def target_gradient(output: Tensor, target: Target) -> tuple[Tensor, Tensor | None]:
    """The backward seed at the model output and the target class per sample (if classes).

    ``target``: None (each sample's predicted class), an int (that class for every sample), a
    sequence or tensor with one class per sample, or a callable mapping the output (N, K) to one
    scalar objective per sample (N,).
    """
    n, k = output.shape
    check_finite_output(output)
    if is_callable_target(target):
        with torch.enable_grad():
            out = output.detach().requires_grad_(True)
            objective = target(out)
            if not isinstance(objective, Tensor) or objective.shape != (n,):
                raise InvalidTargetError(
                    "a callable target must return one scalar per sample, shape "
                    f"({n},); got {getattr(objective, 'shape', type(objective).__name__)}.")
            if not objective.is_floating_point() or not objective.requires_grad:
                why = ("does not depend on the output" if objective.is_floating_point()
                       else "is not floating point")
                raise InvalidTargetError(
                    "a callable target must compute its objective from the output it is given "
                    f"with torch operations (a float tensor that depends on it); got a "
                    f"{objective.dtype} tensor that {why}.")
            bad = non_finite_samples(objective)
            if bad:
                raise NonFiniteError(
                    f"the callable target returned NaN or Inf for samples {bad[:20]}; it must "
                    "give a finite objective.")
            (grad,) = torch.autograd.grad(objective.sum(), out)
        return grad.detach(), None
    if target is None:
        classes = output.detach().argmax(1)
    elif isinstance(target, bool):
        raise InvalidTargetError("target must be a class index, not a bool.")
    elif isinstance(target, int):
        classes = torch.full((n,), target, dtype=torch.long, device=output.device)
    else:
        classes = _target_tensor(target).to(output.device)
        if classes.is_floating_point() or classes.dtype == torch.bool:
            raise InvalidTargetError(f"target classes must be integers, got {classes.dtype}.")
        classes = classes.long().flatten()
        check_target_count(classes, n)
        if classes.numel() == 1:
            classes = classes.expand(n).clone()
    if (classes < 0).any() or (classes >= k).any():
        bad = classes[(classes < 0) | (classes >= k)].tolist()
        raise InvalidTargetError(f"target class(es) {bad} out of range: the model has {k} "
                                 "outputs (valid classes 0..{}).".format(k - 1))
    grad = torch.zeros_like(output).scatter_(1, classes[:, None], 1.0)
    return grad.detach(), classes


def non_finite_samples(t: Tensor) -> list[int]:
    """The samples (rows of dimension 0) of ``t`` that hold NaN or Inf."""
    bad = ~torch.isfinite(t.detach())
    if bad.dim() > 1:
        bad = bad.flatten(1).any(1)
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else []


def check_finite_output(output: Tensor) -> None:
    """The model's logits must be finite: inputs that overflow inside the model give NaN or
    Inf there, and every map computed from them would be meaningless."""
    samples = non_finite_samples(output)
    if samples:
        raise non_finite_output_error(samples)


def non_finite_output_error(samples: list[int], where: str = "") -> NonFiniteError:
    """The error for a model output with NaN or Inf at ``samples`` (rows of the batch the
    model ran on; ``samples`` and ``where`` are kept on the error so that a caller that ran
    a part of its batch, or points around it, can name its own samples instead)."""
    error = NonFiniteError(
        f"the model's output is NaN or Inf for samples {samples[:20]}"
        f"{' ...' if len(samples) > 20 else ''}{where}: the inputs overflow inside the model "
        "(check their scale: images are usually normalised to about [-3, 3]).")
    error.samples, error.where = samples, where  # type: ignore[attr-defined]
    return error


def _target_tensor(target: Any) -> Tensor:
    """A target sequence or tensor as a tensor; anything else is an InvalidTargetError."""
    try:
        return torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidTargetError(
            f"cannot read target {target!r} as class indices: {exc}. Give an int, one int per "
            "sample, None for the predicted classes, or a callable.") from None


def check_target_count(target: Target, n: int) -> None:
    """A per-sample target must hold one class per sample (or a single class)."""
    if target is None or isinstance(target, int) or is_callable_target(target):
        return
    count = _target_tensor(target).numel()
    if count not in (1, n):
        raise InvalidTargetError(
            f"got {count} targets for a batch of {n}; give one per sample, a single int, or "
            "None for the predicted class.")


def is_callable_target(target: Target) -> bool:
    return callable(target) and not isinstance(target, Tensor)


def map_target(target: Target, per_sample: Callable[[Tensor], Tensor]) -> Target:
    """Re-lay a per-sample class tensor (``per_sample``: e.g. slice it for a chunk, repeat it
    for copies of the batch); None, ints, single classes and callables apply to every row
    as they are."""
    if target is None or isinstance(target, int) or is_callable_target(target):
        return target
    t = torch.as_tensor(target).flatten()
    if t.numel() == 1:
        return t
    return per_sample(t)


def slice_target(target: Target, start: int, stop: int) -> Target:
    """The part of a per-sample target that belongs to samples ``start:stop``."""
    return map_target(target, lambda t: t[start:stop])
