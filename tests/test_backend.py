"""The ``attnres`` torch.compile backend end to end: convert, compile with Inductor, compare with eager.

The reference is always the same converted module run eagerly (one ``block_attnres``
per sublayer, PyTorch kernels); the compiled run goes through the two-phase lowering,
AOTAutograd and Inductor. Models are tiny and the number of compiles is kept small:
Inductor on CPU builds C++ for every graph.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE
from test_lower import ToyStream

import attnres_rewrite
from attnres_rewrite.passes.lower import count_ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomize_attnres(model: torch.nn.Module) -> None:
    """Non-zero queries and non-unit gains, so the depth softmax is far from uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("attnres.") and name.endswith("query"):
                p.normal_(0.0, 0.5)
            elif name.startswith("attnres.") and name.endswith("key_gain"):
                p.uniform_(0.8, 1.2)


def _converted(model, inputs, num_blocks):
    model = model.to(DEVICE)
    inputs = tuple(t.to(DEVICE) for t in inputs)
    converted = attnres_rewrite.convert(model, inputs, num_blocks=num_blocks)
    _randomize_attnres(converted)
    return converted, inputs


def _run(model, inputs, run=None):
    """Output and every parameter gradient of a weighted squared loss."""
    model.zero_grad(set_to_none=True)
    out = (model if run is None else run)(*inputs)
    weights = torch.linspace(-1, 1, out.shape[-1], device=out.device)
    (out.float() * weights).square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(got, want, name):
    """fp32 tolerance scaled by the tensor's magnitude: a wrong schedule is off by O(1)."""
    scale = want.abs().max().item() + 1e-12
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{name}: {m}")


def _assert_matches_eager(model, inputs, compiled):
    want, want_grads = _run(model, inputs)
    got, got_grads = _run(model, inputs, compiled)
    _assert_close(got, want, "output")
    assert set(got_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in want_grads.items():
        _assert_close(got_grads[name], grad, name)


def _compile(model, reports, **kwargs):
    """The two-phase lowering unless told otherwise: the CUDA schedule, checked here on any device."""
    kwargs.setdefault("lowering", "two_phase")
    return attnres_rewrite.compile(model, options={"report_hook": reports.append}, **kwargs)


def _assert_schedule(report, blocks):
    """One phase 1 per block in the pass's graph, in the forward and in the backward graph."""
    assert count_ops(report.graph_module).get("block_phase1", 0) == blocks
    assert report.left_alone == 0
    graphs = dict(report.aot_graphs)
    assert graphs["forward"].get("block_phase1") == blocks and "block_attnres" not in graphs["forward"]
    assert graphs["backward"].get("block_phase1_backward") == blocks


def test_llama_sample_training_two_lengths_one_compile():
    """dynamic=True: two sequence lengths share one compiled graph (one backend call)."""
    from attnres_rewrite import samples

    model, inputs = samples.get("llama", layers=2, dropout=0.0)
    converted, inputs = _converted(model, inputs, num_blocks=2)
    reports = []
    compiled = _compile(converted, reports, dynamic=True, fullgraph=True)
    longer = (torch.randint(0, 97, (inputs[0].shape[0], inputs[0].shape[1] + 4), device=DEVICE),)
    for ids in (inputs, longer):
        _assert_matches_eager(converted, ids, compiled)
    assert len(reports) == 1
    # 4 sublayers in 2 blocks of 2; the stream output joins the last block's phase 1.
    assert reports[0].groups == [(1, 2), (2, 3)]
    _assert_schedule(reports[0], blocks=2)


def test_cpu_default_decomposes_for_inductor():
    """``lowering="auto"`` on CPU: AttnRes written out in ATen ops, no opaque op left for Inductor."""
    if DEVICE != "cpu":
        pytest.skip("the CPU choice of the auto lowering")
    from attnres_rewrite import samples

    model, inputs = samples.get("llama", layers=2, dropout=0.0)
    converted, inputs = _converted(model, inputs, num_blocks=2)
    reports = []
    _assert_matches_eager(converted, inputs, _compile(converted, reports, lowering="auto"))
    (report,) = reports
    assert report.lowering == "decompose" and report.decomposed == report.attnres_nodes == 5
    graphs = dict(report.aot_graphs)
    assert not any(name.startswith("block_") for counts in graphs.values() for name in counts), graphs


def test_compiled_under_autocast_matches_eager_under_autocast():
    """The traced code promotes mixed-dtype sources (bf16 branch, fp32 stream) as the eager code does."""
    from attnres_rewrite import samples

    model, inputs = samples.get("llama", layers=2, dropout=0.0)
    converted, inputs = _converted(model, inputs, num_blocks=2)
    compiled = attnres_rewrite.compile(converted)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = converted(*inputs)
        got = compiled(*inputs)
    assert got.dtype == want.dtype == torch.bfloat16
    ulp = 2.0**-7 * want.float().abs().max().item()  # bf16: 8 bits of mantissa
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * ulp)


def _aggregation_kernel_inputs(code: str) -> dict[str, int]:
    """Inputs (``const`` pointers) of every Inductor C++ kernel that computes a depth softmax."""
    kernels = re.findall(r"(cpp_fused\w*) = async_compile\.cpp_pybinding\(\[([^\]]*)\]", code)
    return {name: args.count("'const ") for name, args in kernels if "softmax" in name}


def test_cpu_decomposition_reads_each_source_once_per_aggregation():
    """Block representations and partial sums are written once, not recomputed in every later aggregation.

    4 layers in 2 blocks of 4 sublayers: an aggregation has at most 3 sources (``b_0``,
    ``b_1``, the partial sum). Under Inductor's default realisation threshold a source
    that is a sum of up to 4 branch outputs was inlined into each reader, so the last
    kernels read every branch output of the model (14 inputs here, growing with depth);
    the backend's CPU default realises them (9 at most here). Besides the 3 sources a
    kernel may read the query and gain, the next sublayer's norm weight, the embedding
    table and ids (``b_0`` recomputed from the lookup) and the two terms of a partial
    sum it computes itself: 10 is the bound.
    """
    if DEVICE != "cpu":
        pytest.skip("the CPU decomposition's Inductor config")
    from torch._inductor.utils import run_and_get_code

    from attnres_rewrite import samples

    model, inputs = samples.get("llama", layers=4, dropout=0.0)
    converted, inputs = _converted(model.eval(), inputs, num_blocks=2)
    reports = []
    compiled = attnres_rewrite.compile(converted, options={"report_hook": reports.append})
    with torch.no_grad():
        got, codes = run_and_get_code(compiled, *inputs)
        torch.testing.assert_close(got, converted(*inputs), rtol=1e-4, atol=1e-5)
    reads = _aggregation_kernel_inputs("\n".join(codes))
    assert len(reads) >= 8, reads
    assert max(reads.values()) <= 10, reads
    assert reports[0].inductor_config["realize_reads_threshold"] == 1


def test_decomposition_config_yields_to_the_callers_options():
    from attnres_rewrite.backend import lowering_config

    assert lowering_config("decompose", {})["realize_reads_threshold"] == 1
    assert lowering_config("decompose", {"realize_reads_threshold": 4}) == {"realize_reads_threshold": 4}
    assert lowering_config("two_phase", {"epilogue_fusion": False}) == {"epilogue_fusion": False}


def test_vit_sample_training():
    from attnres_rewrite import samples

    model, inputs = samples.get("vit", layers=2, dropout=0.0)
    converted, inputs = _converted(model, inputs, num_blocks=2)
    reports = []
    _assert_matches_eager(converted, inputs, _compile(converted, reports))
    assert reports[0].groups == [(1, 2), (2, 3)]
    _assert_schedule(reports[0], blocks=2)


class _LogitsOnly(torch.nn.Module):
    """HF models return a ModelOutput; the comparison wants the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def test_hf_llama_training():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = _LogitsOnly(transformers.LlamaForCausalLM(cfg).eval())
    converted, inputs = _converted(model, (torch.randint(0, 64, (2, 7)),), num_blocks=2)
    reports = []
    _assert_matches_eager(converted, inputs, _compile(converted, reports))
    _assert_schedule(reports[0], blocks=2)


def test_mode_options_fullgraph_and_no_grad():
    """Inference graph, Inductor mode passed through, the schedule still applied."""
    model = ToyStream(layers=4, num_blocks=2).to(DEVICE)
    x = torch.randn(2, 5, 8, device=DEVICE)
    reports = []
    compiled = _compile(model, reports, mode="max-autotune-no-cudagraphs", fullgraph=True)
    with torch.no_grad():
        _assert_close(compiled(x), model(x), "output")
    (report,) = reports
    assert report.inductor_config.get("max_autotune") is True
    assert not report.inductor_config.get("triton.cudagraphs", False)
    assert [kind for kind, _ in report.aot_graphs] == ["inference"]
    assert report.aot_graphs[0][1].get("block_phase1") == 2


_SUBPROCESS = textwrap.dedent(
    """
    import sys, torch
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    assert "attnres_rewrite" not in sys.modules
    compiled = torch.compile(model, backend="attnres", dynamic=False)  # resolved through the entry point
    for batch in (2, 3):  # two graphs, one log line
        x = torch.randn(batch, 4)
        torch.testing.assert_close(compiled(x), model(x))
    print("OK", "attnres_rewrite" in sys.modules)
    """
)


def test_entry_point_without_import_and_unconverted_model_logs_once():
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OK", "True"]
    assert proc.stderr.count("no AttnRes nodes") == 1, proc.stderr
    assert "attnres_rewrite.convert(" in proc.stderr


def test_our_options_are_split_from_inductor_options():
    """``two_phase`` / ``report_hook`` never reach Inductor; unknown Inductor options fail early."""
    from attnres_rewrite.backend import _inductor_config, _split_options

    ours, inductor = _split_options(
        {"two_phase": False, "lowering": "auto", "report_hook": print, "epilogue_fusion": False}
    )
    assert ours == {"two_phase": False, "lowering": "auto", "report_hook": print}
    assert _inductor_config("max-autotune-no-cudagraphs", inductor, None) == {
        **_inductor_config("max-autotune-no-cudagraphs", {}, None),
        "epilogue_fusion": False,
    }
    with pytest.raises(RuntimeError, match="Unexpected optimization option"):
        _inductor_config(None, {"not_an_inductor_option": 1}, None)


def test_lowering_choice_per_device():
    from attnres_rewrite.backend import choose_lowering

    assert choose_lowering("auto", True, "cuda") == "two_phase"
    assert choose_lowering("auto", True, "cpu") == "decompose"
    assert choose_lowering("two_phase", True, "cpu") == "two_phase"
    assert choose_lowering("auto", False, "cuda") == "single"
    with pytest.raises(ValueError, match="lowering must be one of"):
        choose_lowering("fast", True, "cpu")
