"""The two-phase lowering pass on hand-written Block AttnRes streams, without Inductor.

The pass runs on the Dynamo graph; AOTAutograd (with pass-through compilers that
record the forward and backward graphs) then differentiates the phase ops. Every
result is compared with the same module run eagerly, i.e. with one
``block_attnres`` call per sublayer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import attnres_rewrite  # noqa: F401  (registers torch.ops.attnres)
from attnres_rewrite.passes.lower import count_ops, decompose, lower_two_phase
from attnres_rewrite.reference import block_partition, mode_scale


class ToyStream(nn.Module):
    """A Block AttnRes stream written the way the rewrite emits it.

    Mirrors :func:`attnres_rewrite.reference.block_attnres_stream`: sublayer ``l``
    reads ``block_attnres([b_0..b_{n-1}] (+ partial), query[l], key_gain[l], eps, scale)``
    and the stream output aggregates every completed block with row ``L``.
    ``query_style`` changes how the query rows reach the op, to exercise the pass's
    slice, stack and refusal paths.
    """

    def __init__(self, layers=6, num_blocks=3, dim=16, mode="paper", query_style="rows"):
        super().__init__()
        self.blocks = block_partition(layers, num_blocks)
        self.mode, self.query_style, self.eps = mode, query_style, 1e-6
        self.embed = nn.Linear(8, dim)
        self.sublayers = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(layers))
        self.query = nn.Parameter(torch.randn(layers + 1, dim) * 0.5)
        self.key_gain = nn.Parameter(1 + torch.randn(layers + 1, dim) * 0.1)

    def _query(self, row: int, last: torch.Tensor) -> torch.Tensor:
        if self.query_style == "scaled":  # not a plain row: the pass must hoist and stack
            return self.query[row] * 1.5
        if self.query_style == "data":  # depends on an earlier sublayer: cannot be hoisted
            return self.query[row] + 1e-3 * last.mean()
        return self.query[row]

    def _aggregate(self, sources, row, last):
        scale = mode_scale(self.mode, len(sources))
        return torch.ops.attnres.block_attnres(sources, self._query(row, last), self.key_gain[row], self.eps, scale)

    def forward(self, x):
        completed = [self.embed(x)]
        last = completed[0]
        for block in self.blocks:
            partial = None
            for layer in block:
                sources = completed if partial is None else [*completed, partial]
                last = self.sublayers[layer](self._aggregate(sources, layer, last))
                partial = last if partial is None else partial + last
            completed.append(partial)
        return self._aggregate(completed, len(self.sublayers), last)


class Recorder:
    """Dynamo backend: run the pass, then AOTAutograd with recording pass-through compilers."""

    def __init__(self, two_phase=True, lowering="two_phase"):
        self.two_phase, self.lowering = two_phase, lowering
        self.reports, self.graphs, self.targets = [], [], {}

    def _record(self, kind):
        def compiler(gm, example_inputs):
            self.graphs.append((kind, count_ops(gm)))
            calls = [n for n in gm.graph.nodes if n.op == "call_function"]
            self.targets[kind] = [(str(n.target), getattr(n.meta.get("val"), "ndim", None)) for n in calls]
            return make_boxed_func(gm.forward)

        return compiler

    def __call__(self, gm, example_inputs):
        if self.lowering == "decompose":
            self.reports.append(decompose(gm))
        else:
            self.reports.append(lower_two_phase(gm, two_phase=self.two_phase))
        aot = aot_autograd(fw_compiler=self._record("forward"), bw_compiler=self._record("backward"))
        return aot(gm, example_inputs)


def _loss_and_grads(model, x, run=None):
    """Output and every parameter gradient of ``model`` (run through ``run`` if given)."""
    model.zero_grad()
    out = (model if run is None else run)(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_against_eager(model, backend):
    """fp64, so that any difference beyond rounding would mean a wrong schedule."""
    torch._dynamo.reset()
    model = model.double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    want, want_grads = _loss_and_grads(model, x)
    got, got_grads = _loss_and_grads(model, x, torch.compile(model, backend=backend, fullgraph=True))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    ("layers", "num_blocks", "groups"),
    [
        (6, 3, [(1, 2), (2, 2), (3, 3)]),  # S=2; the stream output joins the last block
        (5, 3, [(1, 2), (2, 2), (3, 2)]),  # last block has one sublayer (+ the output)
        (8, 2, [(1, 4), (2, 5)]),
    ],
)
def test_one_phase1_per_block_and_exact(layers, num_blocks, groups):
    model, rec = ToyStream(layers, num_blocks), Recorder()
    _check_against_eager(model, rec)
    (report,) = rec.reports
    assert report.groups == groups
    assert report.left_alone == 0
    assert count_ops(report.graph_module) == {"block_phase1": len(groups), "block_phase2": layers + 1}
    fw, bw = dict(rec.graphs)["forward"], dict(rec.graphs)["backward"]
    assert fw.get("block_attnres", 0) == 0 and fw["block_phase1"] == len(groups)
    assert bw["block_phase1_backward"] == len(groups)
    assert "block_attnres_backward" not in bw
    # No autograd glue around phase 1's o: per-query selects would make the backward
    # zero-fill an (S, tokens, d) gradient per query and add them up; unbind stacks once.
    # (Row selects of the (L + 1, d) query/gain parameters remain: 2-D and tiny.)
    backward = rec.targets["backward"]
    glue = [(t, nd) for t, nd in backward if ("select_backward" in t or "select_scatter" in t) and nd != 2]
    assert not glue, glue
    assert sum("aten.stack" in t for t, _ in backward) == 3 * len(groups)


def test_exact_mode_scales_survive_the_lowering():
    _check_against_eager(ToyStream(6, 3, mode="exact"), Recorder())


def test_full_attnres_keeps_single_calls():
    """N = L: no two sublayers share completed sources; only the output joins the last one."""
    model, rec = ToyStream(4, 4), Recorder()
    _check_against_eager(model, rec)
    (report,) = rec.reports
    assert report.groups == [(4, 2)]
    assert report.left_alone == 3


def test_queries_that_are_not_rows_are_hoisted_and_stacked():
    model, rec = ToyStream(6, 3, query_style="scaled"), Recorder()
    _check_against_eager(model, rec)
    assert rec.reports[0].phase1_calls == 3
    assert any(n.target is torch.stack for n in rec.reports[0].graph_module.graph.nodes)


def test_queries_depending_on_sublayer_outputs_are_left_alone():
    """A query computed from the block's own outputs cannot exist before phase 1."""
    model, rec = ToyStream(6, 3, query_style="data"), Recorder()
    _check_against_eager(model, rec)
    report = rec.reports[0]
    assert report.phase1_calls == 0 and report.left_alone == report.attnres_nodes == 7


def test_two_phase_off_leaves_the_graph_alone():
    model, rec = ToyStream(6, 3), Recorder(two_phase=False)
    _check_against_eager(model, rec)
    assert rec.reports[0].phase1_calls == 0
    assert count_ops(rec.reports[0].graph_module) == {"block_attnres": 7}


def test_bfloat16_stream_keeps_its_dtype():
    """Phase 2 gets the aggregate's dtype from the graph's metadata, not a default."""
    torch._dynamo.reset()
    model, rec = ToyStream(4, 2).to(torch.bfloat16), Recorder()
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend=rec, fullgraph=True)(x)
    assert got.dtype == torch.bfloat16
    assert rec.reports[0].phase1_calls == 2
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_graph_without_metadata_is_left_alone():
    """Without dtype metadata (a plain symbolic trace) the pass refuses rather than guesses."""
    gm = torch.fx.symbolic_trace(ToyStream(6, 3))
    report = lower_two_phase(gm)
    assert report.attnres_nodes == 7 and report.phase1_calls == 0 and report.left_alone == 7
    assert count_ops(gm) == {"block_attnres": 7}


def test_decompose_is_exact_and_leaves_no_attnres_op():
    """The CPU lowering: every call written out in ATen ops; AOTAutograd differentiates them."""
    model, rec = ToyStream(6, 3, mode="exact"), Recorder(lowering="decompose")
    _check_against_eager(model, rec)
    (report,) = rec.reports
    assert report.lowering == "decompose" and report.decomposed == report.attnres_nodes == 7
    assert count_ops(report.graph_module) == {}
    assert all(counts == {} for _, counts in rec.graphs), rec.graphs
