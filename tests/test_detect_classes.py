"""Detection by what the graph computes, one small hand-written model per class of miss.

Each model is the minimal form of a pattern found in architectures outside the test
suite: a norm that casts back with ``type_as``, parallel branches with and without
dropout around their sum, a sum of experts inside one MLP module, a branch that pads
and slices the sequence, a model that reads its input's shape. The reference for each
is what the stream is (kind and sublayers) and an exact-mode conversion equal to the
original.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnres_rewrite as ar

D = 16


def _ids(seq=16):
    return torch.randint(0, 50, (2, seq))


class CastBackNorm(nn.Module):
    """RMSNorm with a ``(1 + w)`` gain, computed in fp32 and cast back with ``type_as``."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(D)), eps

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)).type_as(x)


class InlineNorms(nn.Module):
    """Norms written inline in the layer's forward (no module at all): RMS and LayerNorm-style."""

    def __init__(self, layers=2):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(2 * layers))

    def forward(self, ids):
        x = self.emb(ids)
        for i, f in enumerate(self.fs):
            if i % 2:
                h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, correction=0) + 1e-5)
            else:
                h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            x = x + f(h)
        return x


class Stack(nn.Module):
    def __init__(self, layer, layers=3):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.layers = nn.ModuleList(layer() for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return x


class CastBackLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.f = CastBackNorm(), nn.Linear(D, D)

    def forward(self, x):
        return x + self.f(self.norm(x))


class Parallel(nn.Module):
    """``x + drop(attn(ln(x)) + mlp(ln(x)))``: two sublayers whatever ``drop`` is."""

    def __init__(self, dropout: bool):
        super().__init__()
        self.ln, self.attn, self.mlp = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()

    def forward(self, x):
        h = self.ln(x)
        return x + self.drop(self.attn(h) + self.mlp(h))


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.routed, self.shared = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h):
        return self.routed(h) + self.shared(h)


class ExpertLayer(nn.Module):
    """Attention and an MLP whose output is a sum of experts: two sublayers, not three."""

    def __init__(self):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D), Experts()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PadLayer(nn.Module):
    """Pads the sequence to a multiple of 8 and slices it back: its output length is another expression."""

    def __init__(self):
        super().__init__()
        self.ln, self.f = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        t = x.shape[1]
        pad = (8 - t % 8) % 8
        h = self.ln(x)
        if pad > 0:
            h = nn.functional.pad(h, (0, 0, 0, pad))
        return x + self.f(h)[:, :t]


class ShapeReader(nn.Module):
    """A stream that starts at a graph input whose shape the model reads."""

    def __init__(self, layers=3):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(layers))

    def forward(self, h):
        b, t, d = h.shape
        for n, f in zip(self.norms, self.fs):
            h = h + f(n(h))
        return h.reshape(b * t, d)


CASES = {
    "cast_back_norm": (lambda: Stack(CastBackLayer), lambda: (_ids(),), 3, "prenorm"),
    "inline_norms": (InlineNorms, lambda: (_ids(),), 4, "prenorm"),
    "parallel_with_dropout": (lambda: Stack(lambda: Parallel(True), 2), lambda: (_ids(),), 4, "prenorm"),
    "parallel": (lambda: Stack(lambda: Parallel(False), 2), lambda: (_ids(),), 4, "prenorm"),
    "experts_inside_mlp": (lambda: Stack(ExpertLayer, 2), lambda: (_ids(),), 4, "prenorm"),
    "pad_and_slice_t16": (lambda: Stack(PadLayer), lambda: (_ids(16),), 3, "prenorm"),
    "pad_and_slice_t13": (lambda: Stack(PadLayer), lambda: (_ids(13),), 3, "prenorm"),
    "input_shape_read": (ShapeReader, lambda: (torch.randn(2, 5, D),), 3, "prenorm"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stream_kind_sublayers_and_exact_conversion(name):
    build, inputs, sublayers, kind = CASES[name]
    torch.manual_seed(0)
    model, example = build().eval(), inputs()
    (stream,) = ar.inspect(model, example).streams
    assert (stream.kind, stream.num_sublayers) == (kind, sublayers), stream
    assert len(set(stream.sublayers)) == sublayers  # no two sublayers share a module path
    converted = ar.convert(model, example, mode="exact", num_blocks=2)
    report = ar.equivalence(model, converted, example)
    assert report.max_abs <= 1e-5 * report.max_ref, report


def test_report_says_which_norms_were_found_and_how():
    (inline,) = ar.inspect(InlineNorms().eval(), (_ids(),)).streams
    assert [n.split(" ")[-1] for n in inline.norms] == ["(layer)", "(rms)"]
    (cast,) = ar.inspect(Stack(CastBackLayer).eval(), (_ids(),)).streams
    assert cast.norms == [f"layers.{i}.norm (rms)" for i in range(3)]
    assert cast.eps == 1e-6


def test_dropout_around_parallel_branches_applies_to_each_branch_in_training():
    """The sum's dropout becomes one dropout per branch: active in train mode, identity in eval."""
    torch.manual_seed(0)
    model = Stack(lambda: Parallel(True), 2).eval()
    ids = _ids()
    converted = ar.convert(model, (ids,), mode="exact")
    converted.train()
    with torch.no_grad():
        assert not torch.equal(converted(ids), converted(ids))
        converted.eval()
        torch.testing.assert_close(converted(ids), model(ids), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# checks that cannot pass vacuously, and inputs the check invents


class RandomMasking(nn.Module):
    """Drops embedding rows at random, in eval mode too: not a function of its inputs alone."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(3))
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(3))

    def forward(self, ids):
        x = self.emb(ids) * (torch.rand(ids.shape) > 0.3).unsqueeze(-1)
        for n, f in zip(self.norms, self.fs):
            x = x + f(n(x))
        return x


class ZeroHead(RandomMasking):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids):
        x = self.emb(ids)
        for n, f in zip(self.norms, self.fs):
            x = x + f(n(x))
        return self.head(x)


class ImageTokens(Stack):
    """Needs exactly two image tokens (id 49) per row, as a multimodal model needs one per image."""

    def __init__(self):
        super().__init__(CastBackLayer, 2)

    def forward(self, ids):
        # like a multimodal model's count check: eager only (a trace skips it, as those models' checks do)
        if not torch.compiler.is_compiling() and not bool(((ids == 49).sum(-1) == 2).all()):
            raise ValueError("each row needs exactly 2 image tokens")
        return super().forward(ids)


def test_equivalence_runs_both_models_on_the_same_random_numbers():
    torch.manual_seed(0)
    model = RandomMasking().eval()
    converted = ar.convert(model, (_ids(),), mode="exact")
    report = ar.equivalence(model, converted, (_ids(),))
    assert report.max_abs <= 1e-5 * report.max_ref and not report.inconclusive


def test_equivalence_on_a_constant_output_is_inconclusive():
    torch.manual_seed(0)
    model = ZeroHead().eval()
    converted = ar.convert(model, (_ids(),), mode="exact")
    report = ar.equivalence(model, converted, (_ids(),))
    assert report.max_ref == 0 and report.inconclusive and "does not vary with the input" in report.reason
    assert report.stream_rms > 0


def test_inputs_the_check_cannot_resample_fall_back_to_the_example_or_the_callers():
    torch.manual_seed(0)
    ids = torch.randint(0, 49, (2, 8))
    ids[:, :2] = 49
    model = ImageTokens().eval()
    converted = ar.convert(model, (ids,), mode="exact")
    report = ar.equivalence(model, converted, (ids,))
    assert report.inputs == "example" and report.max_abs <= 1e-5 * report.max_ref
    other = torch.randint(0, 49, (2, 11))
    other[:, 3:5] = 49
    given = ar.equivalence(model, converted, (ids,), check_inputs=(other,))
    assert given.inputs == "given" and given.input_shapes == [[2, 11]]
    with pytest.raises(ar.errors.InvalidInputError, match="could not run the models on check inputs.*image tokens"):
        ar.equivalence(model, converted, (ids,), check_inputs=(torch.randint(0, 49, (2, 8)),))
