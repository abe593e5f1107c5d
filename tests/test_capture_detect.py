"""Capture and detection: which streams are found, how they are classified, and why.

Toy models each exercise one thing the detector must see through (casts, clones,
dropout, in-place adds, layer-scale, sandwich norms, reshapes inside a branch,
parallel branches) or must refuse (post-norm, post-activation, single adds, shape
changes, channel-first convolutions).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite import reference, samples
from attnres_rewrite.api import convert_captured, equivalence, inspect_captured, rewritten_graphs
from attnres_rewrite.errors import InvalidInputError, NoResidualStreamError, NotConvertibleError, TraceError
from attnres_rewrite.passes.capture import capture

D = 20


def _mlp(d=D, hidden=28):
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


class Stack(nn.Module):
    """``x = embed(ids)``; then ``layers`` residual updates written by ``step``; then a head."""

    def __init__(self, step: str, layers: int = 3, d: int = D) -> None:
        super().__init__()
        self.step = step
        self.embed = nn.Embedding(30, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.post = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.fs = nn.ModuleList(_mlp(d) for _ in range(layers))
        self.gs = nn.ModuleList(_mlp(d) for _ in range(layers))
        self.gamma = nn.Parameter(torch.full((d,), 0.1))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(d, 7)

    def forward(self, ids):
        x = self.embed(ids)
        for n, p, f, g in zip(self.norms, self.post, self.fs, self.gs):
            if self.step == "prenorm":
                x = x + f(n(x))
            elif self.step == "additive":
                x = x + f(x)
            elif self.step == "layerscale":
                x = x + self.gamma * self.drop(f(n(x)))
            elif self.step == "sandwich":
                x = x + p(f(n(x)))
            elif self.step == "inplace":
                x = x.clone()
                x += f(n(x))
            elif self.step == "casts":
                x = x.contiguous().to(torch.float32) + f(n(x.clone())).to(torch.float32)
            elif self.step == "branch_reshape":
                b, t, d = x.shape
                x = x + f(n(x).reshape(b * t, d)).view(b, t, d)
            elif self.step == "neox":
                x = x + (f(n(x)) + g(p(x)))
            elif self.step == "postnorm":
                x = n(x + f(x))
            elif self.step == "postact":
                x = torch.relu(x + f(x))
            elif self.step == "flatten_stream":
                b, t, d = x.shape
                y = x.view(b * t, d)
                y = y + f(n(y))
                x = y.view(b, t, d) + g(p(y.view(b, t, d)))
            else:
                raise ValueError(self.step)
        return self.head(x)


def _ids(batch=2, seq=6):
    return torch.randint(0, 30, (batch, seq))


def _inspect(model, inputs):
    report = ar.inspect(model.eval(), inputs)
    return report, report.convertible


@pytest.mark.parametrize(
    "step, kind, per_layer",
    [
        ("prenorm", "prenorm", 1),
        ("additive", "additive", 1),
        ("layerscale", "prenorm", 1),
        ("sandwich", "prenorm", 1),
        ("inplace", "prenorm", 1),
        ("casts", "prenorm", 1),
        ("branch_reshape", "prenorm", 1),
        ("neox", "prenorm", 2),
        ("flatten_stream", "prenorm", 2),  # the stream itself is (B*T, d) for one sublayer per layer
    ],
)
def test_toy_streams_are_found_and_convert_exactly(step, kind, per_layer):
    model = Stack(step, layers=2).eval()
    captured = capture(model, (_ids(),))
    report = inspect_captured(captured)
    assert len(report.convertible) == 1, report
    (stream,) = report.convertible
    assert stream.kind == kind
    assert stream.num_sublayers == 2 * per_layer
    assert stream.dim == D
    converted = convert_captured(captured, mode="exact", num_blocks=2)
    rep = equivalence(model, converted, (_ids(),))
    assert rep.max_abs <= 1e-5 * rep.max_ref


def test_module_paths_of_sublayers():
    report, (stream,) = _inspect(Stack("prenorm", layers=2), (_ids(),))
    assert stream.sublayers == ["fs.0", "fs.1"]
    assert stream.norms == ["norms.0 (layer)", "norms.1 (layer)"]
    model, inputs = samples.get("llama", layers=2)
    report, (stream,) = _inspect(model, inputs)
    assert stream.name == "layers"
    assert stream.sublayers == ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]
    assert stream.eps == 1e-5


@pytest.mark.parametrize(
    "step, kind, reason",
    [
        ("postnorm", "postnorm", "post-norm"),
        ("postact", "postact", "post-activation"),
    ],
)
def test_toy_streams_not_convertible(step, kind, reason):
    model = Stack(step, layers=2).eval()
    captured = capture(model, (_ids(),))
    report = inspect_captured(captured)
    assert not report.convertible
    assert [s.kind for s in report.streams] == [kind]
    assert reason in report.streams[0].reason
    with pytest.raises(NotConvertibleError, match=reason):
        convert_captured(captured)


@pytest.mark.parametrize(
    "name, kind, sublayers, reason",
    [
        ("llama", "prenorm", 4, ""),
        ("gpt2", "prenorm", 4, ""),
        ("parallel", "prenorm", 4, ""),
        ("vit", "prenorm", 4, ""),
        ("bert", "postnorm", 4, "post-norm"),
        ("resnet", "postact", None, "post-activation"),
    ],
)
def test_samples_classification(name, kind, sublayers, reason):
    model, inputs = samples.get(name, layers=2) if name not in ("vit", "resnet") else samples.get(name)
    report = ar.inspect(model, inputs)
    assert len(report.streams) == 1
    (stream,) = report.streams
    assert stream.kind == kind == samples.kind(name)
    assert stream.convertible == (kind == "prenorm")
    if sublayers is not None:
        assert stream.num_sublayers == sublayers
    assert reason in stream.reason
    if stream.convertible:
        assert stream.blocks == [[i, i + 1] for i in range(stream.num_sublayers)]  # default 8 capped at L


@pytest.mark.parametrize("shared_norm", [False, True])
def test_parallel_branches_share_one_input(shared_norm):
    model, inputs = samples.get("parallel", layers=2, shared_norm=shared_norm)
    converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    (plan,) = converted.attnres.plan.streams
    assert plan.num_sublayers == 4
    assert plan.sublayers == [f"layers.{i}.{m}" for i in range(2) for m in ("attn", "mlp")]
    assert plan.inputs == [0, 0, 1, 1]  # attn and mlp of a layer read one aggregation
    assert plan.num_rows == 3
    (graph,) = rewritten_graphs(converted, inputs).values()
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.attnres.block_attnres.default]
    assert len(calls) == 3
    rep = equivalence(model, converted, inputs)
    assert rep.max_abs <= 1e-5 * rep.max_ref


class TwoStreams(nn.Module):
    """Encoder stack, then a decoder stack whose branches also read the encoder output."""

    def __init__(self, d=D):
        super().__init__()
        self.enc = Stack("prenorm", layers=2, d=d)
        self.dec_embed = nn.Embedding(30, d)
        self.dec_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.dec_fs = nn.ModuleList(_mlp(d) for _ in range(3))
        self.cross = nn.Linear(d, d)
        self.enc_norm = nn.LayerNorm(d)

    def forward(self, src, tgt):
        e = self.enc.embed(src)
        for n, f in zip(self.enc.norms, self.enc.fs):
            e = e + f(n(e))
        memory = self.enc_norm(e).mean(1, keepdim=True)
        y = self.dec_embed(tgt)
        for n, f in zip(self.dec_norms, self.dec_fs):
            y = y + f(n(y) + self.cross(memory))
        return y


def test_two_streams():
    model = TwoStreams().eval()
    inputs = (_ids(), _ids(2, 5))
    report = ar.inspect(model, inputs)
    assert [(s.num_sublayers, s.kind) for s in report.streams] == [(2, "prenorm"), (3, "prenorm")]
    assert report.streams[0].name != report.streams[1].name
    converted = ar.convert(model, inputs, mode="exact")
    assert len(converted.attnres.plan.streams) == 2
    rep = equivalence(model, converted, inputs)
    assert rep.max_abs <= 1e-5 * rep.max_ref


class ConvStream(nn.Module):
    """Channel-first stream ``x + conv(norm(x))``; GroupNorm is scale-invariant, BatchNorm is not."""

    def __init__(self, norm: str):
        super().__init__()
        make = {"group": lambda: nn.GroupNorm(2, 6), "batch": lambda: nn.BatchNorm2d(6)}[norm]
        self.norms = nn.ModuleList(make() for _ in range(3))
        self.convs = nn.ModuleList(nn.Conv2d(6, 6, 3, padding=1) for _ in range(3))

    def forward(self, x):
        for n, c in zip(self.norms, self.convs):
            x = x + c(n(x))
        return x.mean((2, 3))


@pytest.mark.parametrize("norm, kind", [("group", "prenorm"), ("batch", "additive")])
def test_channel_first_conv_stream(norm, kind):
    model = ConvStream(norm).eval()
    inputs = (torch.randn(2, 6, 5, 5),)
    captured = capture(model, inputs)
    (stream,) = inspect_captured(captured).streams
    assert stream.convertible and stream.kind == kind
    assert stream.dim == 6 and stream.num_sublayers == 3
    converted = convert_captured(captured, mode="exact", num_blocks=2)
    assert converted.attnres.plan.streams[0].feature_axis == 1
    assert converted.get_parameter(converted.attnres.plan.streams[0].query).shape == (4, 6)
    rep = equivalence(model, converted, inputs)
    assert rep.max_abs <= 1e-5 * rep.max_ref
    # non-zero queries: compare with the reference math on the channel axis
    with torch.no_grad():
        converted.get_parameter(converted.attnres.plan.streams[0].query).normal_()
        x = inputs[0]

        params = reference.StreamParams(
            converted.get_parameter(converted.attnres.plan.streams[0].query),
            converted.get_parameter(converted.attnres.plan.streams[0].key_gain),
        )
        fs = [
            lambda h, n=n, c=c: c(n(h.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
            for n, c in zip(model.norms, model.convs)
        ]
        out = reference.block_attnres_stream(
            x.permute(0, 2, 3, 1), fs, params, num_blocks=2, eps=converted.attnres.plan.streams[0].eps, mode="exact"
        )
        torch.testing.assert_close(converted(x), out.permute(0, 3, 1, 2).mean((2, 3)), rtol=1e-5, atol=1e-5)


def test_deep_stream_200_sublayers():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.fs = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(200))

        def forward(self, x):
            for f in self.fs:
                x = x + f(x)
            return x

    report = ar.inspect(Deep().eval(), (torch.randn(2, 3, 8),))
    (stream,) = report.streams
    assert stream.num_sublayers == 200 and stream.kind == "additive"
    assert len(stream.blocks) == 8


class NoStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class SingleAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(D, D)

    def forward(self, x):
        return x + self.f(x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(D, D)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x + self.f(x)
        return x - self.f(x)


def test_no_residual_stream():
    with pytest.raises(NoResidualStreamError, match="no residual stream"):
        ar.convert(NoStream(), (torch.randn(2, 3, D),))
    assert ar.inspect(NoStream(), (torch.randn(2, 3, D),)).streams == []


def test_single_add_is_not_a_stream():
    report = ar.inspect(SingleAdd(), (torch.randn(2, 3, D),))
    assert report.streams == [] and len(report.skipped) == 1
    assert "length 1" in report.skipped[0].reason
    with pytest.raises(NoResidualStreamError):
        ar.convert(SingleAdd(), (torch.randn(2, 3, D),))


def test_untraceable_model_says_why_and_what_to_try():
    with pytest.raises(TraceError, match="torch.export could not trace") as err:
        ar.inspect(Untraceable(), (torch.randn(2, 3, D),))
    assert "Try" in str(err.value)


@pytest.mark.parametrize(
    "inputs, match",
    [
        ("hello", "example_inputs must be"),
        ((1, 2), "no tensor"),
        ((torch.randn(2, 3, D + 1),), "fails on the example inputs"),
        ({1: torch.randn(2, 3, D)}, "argument names"),
        ((torch.full((2, 3, D), float("nan")),), "NaN"),
    ],
)
def test_wrong_example_inputs(inputs, match):
    with pytest.raises(InvalidInputError, match=match):
        ar.inspect(SingleAdd(), inputs)


def test_not_a_module():
    with pytest.raises(InvalidInputError, match="nn.Module"):
        ar.inspect(lambda x: x, (torch.randn(2, 3),))


def test_kwargs_inputs_and_dynamic_shapes():
    model = Stack("prenorm", layers=2).eval()
    converted = ar.convert(model, {"ids": _ids()})
    for shape in [(1, 4), (5, 13)]:
        ids = _ids(*shape)
        assert converted(ids=ids).shape == (*shape, 7)


def test_report_to_dict_is_json_ready():
    import json

    report = ar.inspect(Stack("prenorm", layers=2).eval(), (_ids(),))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["streams"][0]["kind"] == "prenorm"
    assert data["streams"][0]["blocks"] == [[0, 1], [1, 2]]
