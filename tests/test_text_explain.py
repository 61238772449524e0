"""Per-token attributions (srdxai.text.explain_tokens, and srdxai.explain on token ids).

The oracles here are written from the definitions with plain autograd on the model's
embedding output, without the engine: gradient x input, integrated gradients' completeness,
Occlusion-1 as the logit drop when one token's embedding becomes the baseline.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import srdxai
from small_text_models import TinyKim, TinyLSTM
from srdxai.errors import InvalidInputError, UnknownMethodError
from srdxai.text import explain_tokens, token_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 0, 0, 0], [12, 13, 14, 15, 0, 0],
                    [21, 22, 23, 0, 0, 0]])
MASK = IDS != 0
MODELS = [TinyKim, TinyLSTM]
METHODS = ["saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "occlusion",
           "epsilon_lrp", "deeplift_rescale", "lrp_epsilon", "attnlrp"]


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


def _embedding_gradient(model, ids, mask, target):
    """d logit[target] / d embedding output, by autograd with a hook (the oracle)."""
    leaf = {}

    def hook(module, args, out):
        leaf["e"] = out.detach().requires_grad_(True)
        return leaf["e"]

    handle = model.embedding.register_forward_hook(hook)
    try:
        out = model(ids, attention_mask=mask)
    finally:
        handle.remove()
    grad, = torch.autograd.grad(out.gather(1, target[:, None]).sum(), leaf["e"])
    return leaf["e"].detach(), grad, out.detach()


@pytest.mark.parametrize("cls", MODELS)
def test_gradient_x_input_is_the_embedding_gradient_times_the_embedding(cls):
    model = _model(cls)
    target = torch.tensor([0, 1, 2, 0])
    e, grad, _ = _embedding_gradient(model, IDS, MASK, target)
    expected = (grad * e).sum(2).masked_fill(~MASK, 0)
    got = srdxai.explain(model, IDS, target, "gradient_x_input", attention_mask=MASK)
    assert got.shape == IDS.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", MODELS)
def test_integrated_gradients_complete_against_the_zero_embedding(cls):
    model = _model(cls)
    target = torch.tensor([0, 1, 2, 0])
    a = explain_tokens(model, IDS, target, "integrated_gradients", attention_mask=MASK,
                       steps=256)
    _, _, out = _embedding_gradient(model, IDS, MASK, target)
    # the baseline: zero embeddings at real tokens (padding keeps its own, masked anyway)
    handle = model.embedding.register_forward_hook(
        lambda m, args, o: o * (~MASK)[..., None])
    try:
        base = model(IDS, attention_mask=MASK)
    finally:
        handle.remove()
    gap = (out - base).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(a.sum(1), gap, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("cls", MODELS)
def test_occlusion_1_is_the_drop_when_one_token_becomes_the_baseline(cls):
    model = _model(cls)
    target = torch.tensor([2, 1, 0, 1])
    got = explain_tokens(model, IDS, target, "occlusion", attention_mask=MASK)
    with torch.no_grad():
        clean = model(IDS, attention_mask=MASK).gather(1, target[:, None])[:, 0]
        expected = torch.zeros(IDS.shape)
        for t in range(IDS.shape[1]):
            keep = torch.ones(IDS.shape)
            keep[:, t] = 0
            handle = model.embedding.register_forward_hook(
                lambda m, args, o, k=keep: o * k[..., None])
            try:
                occluded = model(IDS, attention_mask=MASK).gather(1, target[:, None])[:, 0]
            finally:
                handle.remove()
            expected[:, t] = clean - occluded
    torch.testing.assert_close(got, expected.masked_fill(~MASK, 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_a_batch_gives_each_text_its_own_map_and_padding_gets_zero(cls, method):
    model = _model(cls)
    options = {"seed": 0} if method == "smoothgrad" else {}
    batch = srdxai.explain(model, IDS, None, method, attention_mask=MASK, **options)
    assert batch.shape == IDS.shape and bool(torch.isfinite(batch).all())
    assert bool((batch[~MASK] == 0).all())
    for i in range(IDS.shape[0]):
        alone = srdxai.explain(model, IDS[i:i + 1], None, method, attention_mask=MASK[i:i + 1],
                               **options)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    assert not model.embedding._forward_hooks  # nothing left on the user's model


def test_epsilon_lrp_equals_gradient_x_input_on_a_relu_word_cnn():
    # Ancona et al.'s Proposition: with ReLUs (and max pooling) the modified chain rule's
    # f(z)/z is the derivative, so epsilon-LRP is gradient x input (up to epsilon)
    model = _model(TinyKim)
    lrp = srdxai.explain(model, IDS, None, "epsilon_lrp", attention_mask=MASK)
    gxi = srdxai.explain(model, IDS, None, "gradient_x_input", attention_mask=MASK)
    torch.testing.assert_close(lrp, gxi, rtol=1e-2, atol=1e-3)


def test_a_tokenizers_batch_is_read_with_its_mask():
    model = _model(TinyKim)
    encoded = {"input_ids": IDS, "attention_mask": MASK.long()}
    from_batch = srdxai.explain(model, encoded, None, "gradient_x_input")
    direct = srdxai.explain(model, IDS, None, "gradient_x_input", attention_mask=MASK)
    torch.testing.assert_close(from_batch, direct)


def test_baselines_pad_token_and_tensor():
    model = _model(TinyLSTM)
    with torch.no_grad():
        model.embedding.weight[0] = 0.5  # a padding embedding that is not zero
    pad = explain_tokens(model, IDS, 0, "integrated_gradients", attention_mask=MASK,
                         baseline="pad", steps=64)
    as_tensor = explain_tokens(model, IDS, 0, "integrated_gradients", attention_mask=MASK,
                               baseline=model.embedding.weight[0].detach().clone(), steps=64)
    as_token = explain_tokens(model, IDS, 0, "integrated_gradients", attention_mask=MASK,
                              baseline=0, steps=64)
    zero = explain_tokens(model, IDS, 0, "integrated_gradients", attention_mask=MASK,
                          steps=64)
    torch.testing.assert_close(pad, as_tensor)
    torch.testing.assert_close(pad, as_token)
    assert not torch.allclose(pad, zero)


def _transformers():
    """transformers imports torchvision for some models: through the CPU-torch shim."""
    try:
        from _compat import import_torchvision

        import_torchvision()
    except ImportError:
        pass  # no torchvision: transformers' text models import without it
    return pytest.importorskip("transformers")


def test_a_hugging_face_sequence_classifier():
    transformers = _transformers()
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     num_labels=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    for method in ("gradient_x_input", "integrated_gradients", "occlusion", "attnlrp"):
        batch = srdxai.explain(model, IDS, None, method, attention_mask=MASK)
        assert batch.shape == IDS.shape and bool(torch.isfinite(batch).all())
        alone = srdxai.explain(model, IDS[1:2], None, method, attention_mask=MASK[1:2])
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)
    assert not model.get_input_embeddings()._forward_hooks


def test_bad_text_inputs_raise_typed_errors():
    model = _model(TinyKim)
    with pytest.raises(InvalidInputError, match="batch dimension"):
        srdxai.explain(model, IDS[0], None, "saliency")
    with pytest.raises(InvalidInputError, match="does not match"):
        srdxai.explain(model, IDS, None, "saliency", attention_mask=MASK[:, :3])
    with pytest.raises(InvalidInputError, match="no real token"):
        srdxai.explain(model, IDS, None, "saliency", attention_mask=torch.zeros_like(MASK))
    with pytest.raises(InvalidInputError, match="unknown baseline"):
        explain_tokens(model, IDS, None, "integrated_gradients", baseline="black")
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        explain_tokens(model, IDS, None, "integrated_gradients", baseline=999)
    with pytest.raises(InvalidInputError, match="'zero', 'pad', a token id or a tensor"):
        srdxai.explain(model, IDS, None, "occlusion", baseline=0.0)
    with pytest.raises(InvalidInputError, match="input_ids"):
        token_batch({"ids": IDS})
    with pytest.raises(UnknownMethodError):
        explain_tokens(model, IDS, None, "nonsense")

    class TwoEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.words, self.positions = nn.Embedding(40, 4), nn.Embedding(6, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids):
            return self.fc((self.words(ids) + self.positions.weight).mean(1))

    two = TwoEmbeddings()
    with pytest.raises(InvalidInputError, match="several"):
        srdxai.explain(two, IDS, None, "saliency")
    a = srdxai.explain(two, IDS, None, "gradient_x_input", embedding="words")
    assert a.shape == IDS.shape
    assert not two.words._forward_hooks


def test_a_model_that_raises_leaves_no_hook():
    model = _model(TinyKim)

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = model.embedding

        def forward(self, ids, attention_mask=None):
            self.embedding(ids)
            raise RuntimeError("boom")

    broken = Broken()
    with pytest.raises(Exception):  # noqa: B017 - whatever the method makes of it
        srdxai.explain(broken, IDS, None, "saliency")
    assert not model.embedding._forward_hooks


class _RatioTanh(torch.autograd.Function):
    """tanh whose backward is epsilon-LRP's slope tanh(z) / (z + eps sign z)."""

    @staticmethod
    def forward(ctx, z, eps):
        ctx.save_for_backward(z)
        ctx.eps = eps
        return torch.tanh(z)

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        return grad * torch.tanh(z) / (z + ctx.eps * sign), None


def test_epsilon_lrp_on_an_lstm_gives_its_gates_no_relevance():
    # the oracle, from Arras et al.'s rule written with plain autograd: every sigmoid gate
    # detached (a constant weight), tanh with the epsilon slope, times the embeddings
    model = _model(TinyLSTM).double()
    ids, mask = IDS[:1], MASK[:1]
    eps = 1e-4
    e = model.embedding(ids).detach().requires_grad_(True)
    h = e.new_zeros(1, model.hidden)
    c = torch.zeros_like(h)
    for t in range(ids.shape[1]):
        i, f, g, o = (model.ih(e[:, t]) + model.hh(h)).chunk(4, 1)
        c = torch.sigmoid(f).detach() * c + torch.sigmoid(i).detach() * _RatioTanh.apply(g, eps)
        h = torch.sigmoid(o).detach() * _RatioTanh.apply(c, eps)
    logits = model.fc(h)
    target = int(logits.argmax())
    grad, = torch.autograd.grad(logits[0, target], e)
    expected = (grad * e).sum(2).detach()
    got = srdxai.explain(model, ids, target, "epsilon_lrp", attention_mask=mask, epsilon=eps)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert float(got.abs().max()) < 10 * float(logits.abs().max())  # no 1/z blow-up


def test_attnlrp_gives_an_lstms_gates_no_relevance_too():
    # AttnLRP's identity rule on tanh is epsilon-LRP's slope, and a sigmoid gate's product
    # passes everything to its signal in both: on an LSTM (no attention, no LayerNorm) the two
    # maps agree; with the uniform rule on gates they differed by 20x
    model = _model(TinyLSTM).double()
    attn = srdxai.explain(model, IDS, None, "attnlrp", attention_mask=MASK)
    eps = srdxai.explain(model, IDS, None, "epsilon_lrp", attention_mask=MASK, epsilon=1e-12)
    torch.testing.assert_close(attn, eps, rtol=1e-6, atol=1e-9)


def _tiny_bert():
    transformers = _transformers()
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     num_labels=3, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


_CAMS = ("ablationcam", "gradcam", "gradcam_pp", "layercam", "scorecam", "xgradcam")
_ATTENTION = ("attention_rollout", "transformer_attribution", "srd_tokens")
#: (architecture, method) -> the typed error the method raises, with words of its message
REFUSED = {
    **{("kim", m): (srdxai.errors.UnsupportedOperationError, "attention") for m in _ATTENTION},
    **{("lstm", m): (srdxai.errors.UnsupportedOperationError, "attention") for m in _ATTENTION},
    **{("lstm", m): (InvalidInputError, "no activation") for m in _CAMS},
    ("bert", "fullgrad"): (InvalidInputError, "FullGrad"),
}
#: methods whose map sums to the target logit (float64, logit seed)
# (the LSTM reads its (N, L, E) embeddings one step at a time, which the PFV engine refuses:
# SRD explains it on the operation view, its sigmoid gates constant weights, as Arras et
# al.'s LRP for LSTMs treats them)
CONSERVING = {("kim", "srd"), ("bert", "srd"), ("bert", "srd_tokens"), ("lstm", "srd")}


@pytest.mark.parametrize("arch", ["kim", "lstm", "bert"])
def test_every_method_on_every_text_architecture_maps_or_refuses_clearly(arch):
    from srdxai.methods import METHODS

    model = {"kim": lambda: _model(TinyKim), "lstm": lambda: _model(TinyLSTM),
             "bert": _tiny_bert}[arch]().double()
    ids, mask = IDS[:3], MASK[:3]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = srdxai.text.call_text_model(model, ids, mask)
    target = logits.argmax(1)
    for method in sorted(METHODS):
        options = {"low": -3.0, "high": 3.0} if method == "lrp_epsilon_gamma_box" else {}
        if method == "srd":
            options["seed"] = "logit"
        if method == "smoothgrad":
            options["seed"] = 0
        if (arch, method) in REFUSED:
            error, words = REFUSED[(arch, method)]
            with pytest.raises(error, match=words):
                srdxai.explain(model, ids, target, method, attention_mask=mask, **options)
            continue
        maps = srdxai.explain(model, ids, target, method, attention_mask=mask, **options)
        assert maps.shape == ids.shape, method
        assert bool(torch.isfinite(maps).all()), method
        assert bool((maps[~mask] == 0).all()), method
        alone = srdxai.explain(model, ids[1:2], target[1:2], method, attention_mask=mask[1:2],
                               **options)
        torch.testing.assert_close(maps[1:2], alone, rtol=1e-6, atol=1e-9, msg=method)
        if (arch, method) in CONSERVING:
            torch.testing.assert_close(maps.sum(1), logits.gather(1, target[:, None])[:, 0],
                                       rtol=1e-6, atol=1e-9, msg=method)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.get_input_embeddings()._forward_hooks if arch == "bert" else \
        not model.embedding._forward_hooks


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_other_hugging_face_families(family):
    transformers = _transformers()
    if family == "distilbert":  # masks its attention scores with masked_fill
        config = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2,
                                               hidden_dim=32, num_labels=2,
                                               attn_implementation="eager")
        cls = transformers.DistilBertForSequenceClassification
    else:
        config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=32,
                                            num_labels=2, max_position_embeddings=40,
                                            attn_implementation="eager")
        cls = transformers.RobertaForSequenceClassification
    torch.manual_seed(0)
    model = cls(config).eval().double()
    ids = IDS[:2].clone()
    ids[ids == 0] = 1  # RoBERTa's padding id is 1
    mask = MASK[:2]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    for method in ("gradient_x_input", "integrated_gradients", "occlusion", "attnlrp",
                   "lrp_epsilon", "srd", "srd_tokens"):
        options = {"seed": "logit"} if method == "srd" else {}
        a = srdxai.explain(model, ids, 0, method, attention_mask=mask, **options)
        assert a.shape == ids.shape and bool(torch.isfinite(a).all()), method
        if method.startswith("srd"):  # exact: the map sums to the logit
            torch.testing.assert_close(a.sum(1), logits[:, 0], rtol=1e-6, atol=1e-9)


def test_texts_are_trimmed_to_their_real_tokens_only_where_the_model_ignores_padding():
    from srdxai.text import real_length

    invariant = _model(TinyKim)
    assert real_length(invariant, IDS[1:2], MASK[1:2]) == 3

    class ReadsPadding(nn.Module):
        """Averages over every position, padding included: its logits change without it."""

        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(40, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids, attention_mask=None):
            return self.fc(self.embedding(ids).mean(1))

    reads = ReadsPadding().eval()
    assert real_length(reads, IDS[1:2], MASK[1:2]) == IDS.shape[1]
    # explained on the full padded input: gradient x input sums over real tokens only, and
    # padding positions are reported as 0
    a = srdxai.explain(reads, IDS[1:2], 0, "gradient_x_input", attention_mask=MASK[1:2])
    assert bool((a[0, 3:] == 0).all()) and bool((a[0, :3] != 0).all())
    assert real_length(reads, IDS[:1], MASK[:1]) == IDS.shape[1]  # no padding: full length


class _RescaleActivation(torch.autograd.Function):
    """f(z) whose backward is DeepLIFT-Rescale's slope (f(z) - f(z_ref)) / (z - z_ref)."""

    @staticmethod
    def forward(ctx, z, z_ref, fn):
        ctx.save_for_backward(z, z_ref)
        ctx.fn = fn
        return fn(z)

    @staticmethod
    def backward(ctx, grad):
        z, z_ref = ctx.saved_tensors
        delta = z - z_ref
        small = delta.abs() < 1e-10
        with torch.enable_grad():  # where z barely moves: the true derivative (as Captum)
            leaf = z.detach().requires_grad_(True)
            true, = torch.autograd.grad(ctx.fn(leaf).sum(), leaf)
        slope = (ctx.fn(z) - ctx.fn(z_ref)) / torch.where(small, torch.ones_like(delta), delta)
        return grad * torch.where(small, true, slope), None, None


def _lstm_pass(model, e, activation):
    """TinyLSTM's forward on embeddings ``e``, every sigmoid / tanh through ``activation``."""
    h = e.new_zeros(e.shape[0], model.hidden)
    c = torch.zeros_like(h)
    for t in range(e.shape[1]):
        i, f, g, o = (model.ih(e[:, t]) + model.hh(h)).chunk(4, 1)
        c = activation(f, torch.sigmoid) * c + activation(i, torch.sigmoid) * \
            activation(g, torch.tanh)
        h = activation(o, torch.sigmoid) * activation(c, torch.tanh)
    return model.fc(h)


def test_deeplift_on_an_lstm_follows_the_rescale_rule_with_the_product_rule():
    # the oracle: a baseline pass records every pre-activation in order, the input pass
    # pairs them, products keep autograd's product rule (docs/text.md)
    model = _model(TinyLSTM).double()
    ids = IDS[:1]
    e = model.embedding(ids).detach()
    references = []

    def record(z, fn):
        references.append(z.detach())
        return fn(z)

    _lstm_pass(model, torch.zeros_like(e), record)
    order = iter(references)
    leaf = e.clone().requires_grad_(True)
    logits = _lstm_pass(model, leaf, lambda z, fn: _RescaleActivation.apply(z, next(order), fn))
    target = int(logits.argmax())
    grad, = torch.autograd.grad(logits[0, target], leaf)
    expected = (grad * leaf).sum(2).detach()  # (x - baseline) with the zero baseline
    got = srdxai.explain(model, ids, target, "deeplift_rescale", attention_mask=MASK[:1])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
