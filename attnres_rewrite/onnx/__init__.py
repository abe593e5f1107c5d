"""ONNX export of AttnRes models, verified in onnxruntime.

``export_onnx(model, example_inputs, path)`` writes an ONNX file in which every
``torch.ops.attnres.*`` op is made of standard ONNX ops (optionally wrapped as the
local function ``attnres.BlockAttnRes``) and checks it against PyTorch.
``export_decoder_with_past(model, path)`` writes a causal LM with its KV cache under
optimum's names (``--task text-generation-with-past``), and ``generate_greedy`` runs
greedy decoding with such a file in onnxruntime. ``export_seq2seq_with_past(model, dir)``
does the same for encoder-decoder models (``--task text2text-generation-with-past``:
encoder, first decoder step and decoder with past, optimum's three files), with
``seq2seq.generate_greedy`` to run them.

This subpackage is named ``onnx``; inside it the ONNX library is always imported with
absolute ``import onnx`` (absolute by default in Python 3), and our own modules with
relative imports, so the name shadows nothing.
"""

from __future__ import annotations

from . import seq2seq
from .decoder import TASK, export_decoder_with_past, generate_greedy
from .export import DEFAULT_OPSET, MIN_OPSET, ExportReport, export_onnx, max_opset
from .function import DOMAIN, FUNCTION_NAME, function_proto
from .seq2seq import export_seq2seq_with_past
from .translations import translation_table

__all__ = [
    "DEFAULT_OPSET",
    "DOMAIN",
    "FUNCTION_NAME",
    "MIN_OPSET",
    "TASK",
    "ExportReport",
    "export_decoder_with_past",
    "export_onnx",
    "export_seq2seq_with_past",
    "function_proto",
    "generate_greedy",
    "max_opset",
    "seq2seq",
    "translation_table",
]
