"""``--task text-generation-with-past``: a causal LM with its KV cache in ONNX, and greedy decoding in onnxruntime.

One tiny Llama (random weights, nothing downloaded) is converted in ``exact`` mode and
exported once for the module. The export verifies prompt + decode steps itself; these
tests check the interface optimum-style runners rely on, and that onnxruntime's greedy
tokens equal those of the *original* model's own ``generate`` (with its cache) in PyTorch.
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import pytest
import torch

import attnres_rewrite
from attnres_rewrite.errors import ExportError
from attnres_rewrite.onnx import export_decoder_with_past, generate_greedy, ort_ops
from attnres_rewrite.onnx.decoder import compare_generation
from attnres_rewrite.onnx.function import NORM_FUNCTION_NAME, PARTIAL_NORM_FUNCTION_NAME

ort = pytest.importorskip("onnxruntime")
T = pytest.importorskip("transformers")

LAYERS = 2


@pytest.fixture(scope="module", params=[False, True], ids=["inline", "function"])
def exported(request, tmp_path_factory):
    """The decoder exported inline and as ``attnres.BlockAttnRes`` calls (run by the fused op library, when
    it builds here, in ``generate_greedy`` and in the export's second verification pass)."""
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    original = T.LlamaForCausalLM(cfg).eval()
    reference = copy.deepcopy(original)
    converted = attnres_rewrite.convert(original, {"input_ids": torch.randint(0, 64, (2, 5))}, mode="exact")
    path = tmp_path_factory.mktemp("decoder") / "model.onnx"
    report = export_decoder_with_past(converted, path, steps=3, as_function=request.param)
    return path, report, reference, converted


def test_interface_uses_optimum_names_and_an_empty_first_past(exported):
    path, report, *_ = exported
    graph = onnx.load(str(path), load_external_data=False).graph
    past = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    present = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits", *present]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 6]
    assert report.attnres_ops > 0 and report.task == "text-generation-with-past"
    steps = report.task_verification
    assert report.providers == (
        ["CPUExecutionProvider", ort_ops.FUSED_CPU]
        if report.as_function and ort_ops.available()
        else ["CPUExecutionProvider"]
    )
    for provider in report.providers:  # prompt with an empty past, then decode steps, on each path
        assert [s["past_length"] for s in steps if s["provider"] == provider] == [0, 6, 7, 8]
    assert all(s["reference_max_abs"] > 0 and s["max_abs_diff"] <= 1e-4 * s["reference_max_abs"] for s in steps)


def _runtime_ops(path, tmp_path, fused: bool) -> collections.Counter:
    """Op types of the graph onnxruntime runs, after its own fusions (and inlining the functions it has no kernel for)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    if fused:
        ort_ops.register(options)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node)


def test_onnxruntime_runs_each_norm_as_one_node(exported, tmp_path):
    """2 layers: 5 RMSNorms and 5 aggregations, each norm reading one aggregation.

    The exporter writes ``rsqrt`` as ``Reciprocal(Sqrt)``, which onnxruntime's norm fusion
    does not match: every norm stayed six nodes. Now each is one
    ``SimplifiedLayerNormalization``, and in the function form each aggregation and its
    norm are one ``BlockAttnRes[Partial]RMSNorm`` call, one kernel with the op library.
    """
    path, report, *_ = exported
    norms = 2 * LAYERS + 1
    saved = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    assert saved["Reciprocal"] == 0
    fused = saved[NORM_FUNCTION_NAME] + saved[PARTIAL_NORM_FUNCTION_NAME]
    assert fused == (norms if report.as_function else 0)
    assert report.attnres_ops == norms
    assert _runtime_ops(path, tmp_path, fused=False)["SimplifiedLayerNormalization"] == norms
    if report.as_function and ort_ops.available():
        ops = _runtime_ops(path, tmp_path, fused=True)
        assert ops[NORM_FUNCTION_NAME] + ops[PARTIAL_NORM_FUNCTION_NAME] == norms
        assert ops["SimplifiedLayerNormalization"] == 0


def test_onnxruntime_greedy_tokens_equal_the_original_models_generate(exported):
    path, _, reference, _ = exported
    prompt = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    got = generate_greedy(path, prompt.numpy(), 6)
    assert want.shape == (2, 10)
    np.testing.assert_array_equal(got, want.numpy())


def test_generation_check_passes_on_its_model_and_catches_another(exported):
    path, _, reference, converted = exported
    same = compare_generation(path, converted, max_new_tokens=5, seed=1)
    assert same["tokens_equal"] and same["first_difference"] is None and len(same["onnx_tokens"][0]) == 5
    other = copy.deepcopy(reference)
    with torch.no_grad():
        other.lm_head.weight.copy_(torch.randn_like(other.lm_head.weight))
    differs = compare_generation(path, other, max_new_tokens=5, seed=1)
    assert not differs["tokens_equal"] and differs["first_difference"] is not None


def test_greedy_helper_refuses_a_file_of_another_task(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportError, match="is not a text-generation-with-past export"):
        generate_greedy(path, np.zeros((1, 2), dtype=np.int64), 3)
