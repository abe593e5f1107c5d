"""convert(): equivalence, block partitions, training, gradients, meta-device models.

The AttnRes math is checked against implementations written here (stacked softmax,
own partition) or against ``attnres_rewrite.reference`` run on the toy model's own
sublayers, never against the rewrite's output alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite import reference, samples
from attnres_rewrite.api import convert_captured, equivalence, fresh_inputs, programs, rewritten_graphs
from attnres_rewrite.errors import InvalidInputError, NotConvertibleError
from attnres_rewrite.passes.capture import capture

BLOCK_ATTNRES = torch.ops.attnres.block_attnres.default


class ToyPreNorm(nn.Module):
    """Embedding, ``L`` PreNorm MLP sublayers, final norm and head: sublayers are callable from the test."""

    def __init__(self, layers: int = 5, dim: int = 24, vocab: int = 50, eps: float = 1e-5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in range(layers))
        self.fs = nn.ModuleList(nn.Sequential(nn.Linear(dim, 40), nn.GELU(), nn.Linear(40, dim)) for _ in range(layers))
        self.final = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, vocab)

    def sublayers(self):
        return [lambda h, n=n, f=f: f(n(h)) for n, f in zip(self.norms, self.fs)]

    def forward(self, ids):
        x = self.embed(ids)
        for n, f in zip(self.norms, self.fs):
            x = x + f(n(x))
        return self.head(self.final(x))


def _ids(batch=2, seq=7, vocab=50):
    return torch.randint(0, vocab, (batch, seq))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ToyPreNorm().eval()
    return model, capture(model, (_ids(),))


def _randomise(converted, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in converted.attnres.named_parameters():
            scale = 0.5 if name.endswith("query") else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith("key_gain") else 0.0))


def _stream_params(converted, name):
    child = getattr(converted.attnres, name)
    return reference.StreamParams(child.query.detach(), child.key_gain.detach())


# --------------------------------------------------------------------------------------
# block partitions against the reference stream


@pytest.mark.parametrize(
    "options",
    [
        {"num_blocks": 1},
        {"num_blocks": 2},  # L=5 not divisible by 2
        {"num_blocks": 4},  # S = 2 -> 3 blocks
        {"num_blocks": 5},  # N = L
        {"full": True},
        {"block_size": 3},
        {},
    ],
    ids=["N1", "N2", "N4", "NL", "full", "S3", "default"],
)
@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_partitions_match_reference_stream(toy, options, mode):
    model, captured = toy
    converted = convert_captured(captured, mode=mode, **options)
    _randomise(converted)
    (plan,) = converted.attnres.plan.streams
    assert plan.num_sublayers == 5
    ids = _ids(3, 11)
    with torch.no_grad():
        got = converted(ids)
        kw = {"num_blocks": 5} if options.get("full") else {k: v for k, v in options.items() if k != "full"}
        if not kw:
            kw = {"num_blocks": 5}  # default: min(8, L) blocks
        stream = reference.block_attnres_stream(
            model.embed(ids),
            model.sublayers(),
            _stream_params(converted, plan.name),
            eps=plan.eps,
            mode=mode,
            **kw,
        )
        want = model.head(model.final(stream))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    expected_blocks = reference.block_partition(5, kw.get("num_blocks"), kw.get("block_size"))
    assert plan.blocks == [[r.start, r.stop] for r in expected_blocks]


def _calls(converted):
    (graph,) = rewritten_graphs(converted, (_ids(),)).values()
    return [n for n in graph.graph.nodes if n.target is BLOCK_ATTNRES]


def _sources_per_call(converted):
    return [len(n.args[0]) for n in _calls(converted)]


def test_graph_has_one_aggregation_per_sublayer_and_output(toy):
    _, captured = toy
    # L=5, N=2 -> S=3: blocks [0,3), [3,5); sources: b0 | b0,p | b0,p | b0,b1 | b0,b1,p | output b0,b1,b2
    converted = convert_captured(captured, num_blocks=2)
    assert _sources_per_call(converted) == [1, 2, 2, 2, 3, 3]
    full = convert_captured(captured, full=True)
    assert _sources_per_call(full) == [1, 2, 3, 4, 5, 6]
    one = convert_captured(captured, num_blocks=1)
    assert _sources_per_call(one) == [1, 2, 2, 2, 2, 2]
    # no residual add of the original stream is left: adds that remain are partial sums
    assert all(n.meta.get("attnres", {}).get("role") in ("input", "output") for n in _calls(full))


def test_sources_order_completed_blocks_then_partial(toy):
    _, captured = toy
    converted = convert_captured(captured, num_blocks=2)
    calls = _calls(converted)
    start = calls[0].args[0][0]
    for call in calls:
        assert call.args[0][0] is start  # b_0 first in every call
    # the 3rd call (sublayer 2) uses the partial sum of sublayers 0..1; sublayer 3 sees the completed block
    assert calls[3].args[0][1] is calls[4].args[0][1]


@pytest.mark.parametrize("bad", [0, 6, -1])
def test_num_blocks_out_of_range(toy, bad):
    _, captured = toy
    with pytest.raises(InvalidInputError, match="num_blocks"):
        convert_captured(captured, num_blocks=bad)


@pytest.mark.parametrize("flag", ["num_blocks", "block_size"])
def test_block_counts_and_sizes_beyond_the_sublayers_are_refused_alike(toy, flag):
    """--blocks 7 on 5 sublayers was refused while --block-size 100 was quietly capped to one block."""
    _, captured = toy
    with pytest.raises(InvalidInputError, match=rf"{flag}=6 is out of range .* between 1 and 5"):
        convert_captured(captured, **{flag: 6})
    blocks = convert_captured(captured, **{flag: 5}).attnres.plan.streams[0].blocks
    assert len(blocks) == (5 if flag == "num_blocks" else 1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"num_blocks": 2, "block_size": 2}, "not both"),
        ({"full": True, "num_blocks": 2}, "full"),
        ({"mode": "fancy"}, "mode"),
        ({"eps": 0.0}, "eps"),
        ({"num_blocks": 2.5}, "num_blocks"),
    ],
)
def test_bad_options(toy, options, match):
    model, _ = toy
    with pytest.raises(InvalidInputError, match=match):
        ar.convert(model, (_ids(),), **options)


# --------------------------------------------------------------------------------------
# equivalence on samples


@pytest.fixture(scope="module")
def sample_captures():
    out = {}
    for name, overrides in {
        "llama": {"layers": 2},
        "gpt2": {"layers": 2},
        "parallel": {"layers": 2},
        "vit": {},
    }.items():
        model, inputs = samples.get(name, **overrides)
        out[name] = (model, inputs, capture(model, inputs))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "parallel", "vit"])
def test_exact_mode_equivalence_on_fresh_shapes(sample_captures, name):
    model, inputs, captured = sample_captures[name]
    converted = convert_captured(captured, mode="exact", num_blocks=2)
    report = equivalence(model, converted, inputs)
    assert report.finite
    assert report.max_abs <= 1e-5 * report.max_ref
    # fresh shapes really differ from the example (another batch, and sequence for token models)
    assert report.input_shapes[0][0] == inputs[0].shape[0] + 1
    if inputs[0].dim() == 2:
        assert report.input_shapes[0][1] == inputs[0].shape[1] + 3


@pytest.mark.parametrize("name", ["llama", "gpt2", "parallel", "vit"])
def test_paper_mode_difference_is_reported(sample_captures, name):
    model, inputs, captured = sample_captures[name]
    converted = convert_captured(captured, mode="paper")
    report = equivalence(model, converted, inputs)
    assert report.finite and report.max_ref > 0
    assert report.max_rel < 0.1  # small (norm eps effects only), reported, not required to be ~0


def test_paper_mode_equivalent_when_states_dominate_eps():
    model, inputs = samples.get("llama", layers=2)
    with torch.no_grad():
        model.embed.weight.mul_(1000.0)  # hidden states >> sqrt(eps): RMSNorm(x / K) == RMSNorm(x)
    converted = ar.convert(model, inputs, mode="paper")
    report = equivalence(model, converted, inputs)
    assert report.max_rel <= 1e-5


def test_not_convertible_sample_raises():
    model, inputs = samples.get("bert", layers=2)
    with pytest.raises(NotConvertibleError, match="post-norm"):
        ar.convert(model, inputs)


# --------------------------------------------------------------------------------------
# training and gradients


def _naive_attnres(sources, w, g, eps, scale):
    """Stacked-softmax AttnRes written independently of the package."""
    v = torch.stack(sources)  # (K, ..., d)
    keys = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g
    alpha = torch.softmax((keys * w).sum(-1), dim=0)
    return scale * (alpha.unsqueeze(-1) * v).sum(0)


def _naive_block_stream(x, fs, queries, gains, block_size, eps, mode):
    blocks, partial = [x], None
    for l, f in enumerate(fs):
        if l % block_size == 0 and partial is not None:
            blocks.append(partial)
            partial = None
        srcs = blocks + ([partial] if partial is not None else [])
        h = _naive_attnres(srcs, queries[l], gains[l], eps, len(srcs) if mode == "exact" else 1.0)
        v = f(h)
        partial = v if partial is None else partial + v
    blocks.append(partial)
    return _naive_attnres(blocks, queries[-1], gains[-1], eps, len(blocks) if mode == "exact" else 1.0)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_attnres_gradients_match_naive_reference(toy, mode):
    model, captured = toy
    converted = convert_captured(captured, num_blocks=2, mode=mode)
    _randomise(converted, seed=7)
    (plan,) = converted.attnres.plan.streams
    params = getattr(converted.attnres, plan.name)
    ids = _ids(2, 9)
    target = torch.randn(2, 9, 50)

    converted.zero_grad()
    loss = (converted(ids) - target).pow(2).mean()
    loss.backward()

    q = params.query.detach().clone().requires_grad_(True)
    g = params.key_gain.detach().clone().requires_grad_(True)
    stream = _naive_block_stream(model.embed(ids), model.sublayers(), q, g, math.ceil(5 / 2), plan.eps, mode)
    ref_loss = (model.head(model.final(stream)) - target).pow(2).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params.query.grad, q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(params.key_gain.grad, g.grad, rtol=1e-4, atol=1e-6)
    assert params.query.grad.abs().sum() > 0


def test_training_changes_queries_and_reduces_loss():
    model, (ids,) = samples.get("llama", layers=2, dropout=0.0)
    converted = ar.convert(model, (ids,), num_blocks=2)
    converted.train()
    opt = torch.optim.Adam(converted.parameters(), lr=3e-3)
    targets = torch.randint(0, 97, ids.shape)
    before = converted.attnres.layers.query.detach().clone()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        logits = converted(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(converted.attnres.layers.query.detach(), before)


def test_state_dict_names_round_trip_and_reexport(toy):
    model, captured = toy
    converted = convert_captured(captured, num_blocks=2)
    names = set(converted.state_dict())
    assert set(model.state_dict()) <= names
    (plan,) = converted.attnres.plan.streams
    assert names - set(model.state_dict()) == {plan.query, plan.key_gain}
    assert converted.get_parameter(plan.query).shape == (6, 24)
    assert torch.equal(converted.get_parameter(plan.query), torch.zeros(6, 24))
    assert torch.equal(converted.get_parameter(plan.key_gain), torch.ones(6, 24))
    _randomise(converted)
    again = convert_captured(captured, num_blocks=2)
    again.load_state_dict(converted.state_dict())
    ids = _ids(3, 5)
    torch.testing.assert_close(again(ids), converted(ids))
    program = torch.export.export(converted, (ids,), strict=False)
    torch.testing.assert_close(program.module()(ids), converted(ids))


def test_fresh_inputs_shapes():
    ids = torch.randint(0, 9, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    out = fresh_inputs({"input_ids": ids, "attention_mask": mask})
    assert out["input_ids"].shape == (3, 8) and int(out["input_ids"].max()) < 9
    assert torch.equal(out["attention_mask"], torch.ones(3, 8, dtype=torch.long))


# --------------------------------------------------------------------------------------
# meta device


def test_meta_device_7b_llama_shape_converts_without_weights():
    """Sampled by default on meta: three layers traced, 29 replicated (the full trace takes ~20-60 s)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        use_cache=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    converted = ar.convert(model, {"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    (plan,) = converted.attnres.plan.streams
    assert any(n.startswith("sampled trace: traced layers 0, 1 and the last") for n in converted.attnres.plan.notes)
    assert plan.num_sublayers == 64 and plan.num_blocks == 8 and plan.dim == 4096
    assert plan.sublayers[2 * 17 : 2 * 17 + 2] == ["model.layers.17.self_attn", "model.layers.17.mlp"]
    assert all(p.device.type == "meta" for p in converted.parameters())
    assert converted.get_parameter(plan.query).shape == (65, 4096)
    out = converted(input_ids=torch.zeros(1, 5, dtype=torch.long, device="meta"))
    assert out.logits.shape == (1, 5, 32000)


def test_meta_model_gets_real_weights_by_name():
    """Convert on meta, then attach real weights with load_state_dict(assign=True)."""
    real = ToyPreNorm(layers=3).eval()
    with torch.device("meta"):
        meta = ToyPreNorm(layers=3).eval()
    converted = ar.convert(meta, (_ids(),), num_blocks=2, mode="exact")
    assert all(p.device.type == "meta" for p in converted.parameters())
    state = dict(real.state_dict())
    (plan,) = converted.attnres.plan.streams
    state[plan.query] = torch.zeros(4, 24)
    state[plan.key_gain] = torch.ones(4, 24)
    converted.load_state_dict(state, assign=True)
    ids = _ids(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), real(ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# size-1 example axes and new call signatures


def test_batch_one_sequence_one_example_then_other_sizes():
    """torch.export fixes size-1 axes: such calls get their own program, other sizes share another."""
    torch.manual_seed(0)
    model = ToyPreNorm(layers=2).eval()
    converted = ar.convert(model, (_ids(1, 1),), mode="exact")
    with torch.no_grad():
        for shape in [(1, 1), (3, 1), (1, 6), (4, 9), (2, 3)]:
            ids = _ids(*shape)
            torch.testing.assert_close(converted(ids), model(ids), rtol=1e-5, atol=1e-5)
    (captured,) = programs(converted).values()
    # buckets: (1,1), (>=2,1), (1,>=2), (>=2,>=2): the last two shapes share one program
    assert sorted(p.signature for p in captured) == ["0[1, 1]", "0[1, 6]", "0[3, 1]", "0[4, 9]"]


class OneTokenAtATime(ToyPreNorm):
    def forward(self, ids):
        if ids.shape[1] != 1:
            raise ValueError("one token at a time")
        return super().forward(ids)


def test_model_that_needs_size_one_keeps_its_own_error_for_other_sizes():
    torch.manual_seed(0)
    model = OneTokenAtATime(layers=2).eval()
    converted = ar.convert(model, (_ids(1, 1),), mode="exact")
    with torch.no_grad():
        for batch in (1, 3):
            ids = _ids(batch, 1)
            torch.testing.assert_close(converted(ids), model(ids), rtol=1e-5, atol=1e-5)
        with pytest.raises(InvalidInputError, match="one token at a time"):
            converted(_ids(2, 4))


def test_layer_partition_never_splits_a_layer():
    """Blocks of whole layers, layers read from module paths (a layer may hold 1, 2 or 3 sublayers)."""
    from attnres_rewrite.passes.plan import layer_partition

    paths = [f"layers.{i}.{m}" for i in range(5) for m in ("attn", "mlp")]
    assert layer_partition(paths, 2) == [[0, 4], [4, 8], [8, 10]]
    assert layer_partition(paths, 5) == [[0, 10]]
    uneven = ["h.0.attn", "h.0.cross", "h.0.mlp", "h.1.mlp", "h.2.attn", "h.2.mlp"]
    assert layer_partition(uneven, 1) == [[0, 3], [3, 4], [4, 6]]
    assert layer_partition(uneven, 2) == [[0, 4], [4, 6]]
    with pytest.raises(InvalidInputError, match="layers_per_block=6 is out of range.*5 layers"):
        layer_partition(paths, 6)


def test_layer_aligned_blocks_convert_like_the_equal_sublayer_partition():
    model, inputs = samples.get("llama", layers=3, dropout=0.0)
    with pytest.raises(InvalidInputError, match="do not also pass"):  # refused before any trace
        ar.convert(model, inputs, layers_per_block=2, num_blocks=2)
    converted = ar.convert(model, inputs, layers_per_block=2, mode="exact")
    assert converted.attnres.plan.streams[0].blocks == [[0, 4], [4, 6]]
    assert converted.attnres.plan.layers_per_block == 2
    same = ar.convert(model, inputs, block_size=4, mode="exact")  # 2 sublayers per layer: the same partition
    assert same.attnres.plan.streams[0].blocks == [[0, 4], [4, 6]]
    ids = _ids(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), same(ids), rtol=0, atol=0)
