"""ONNX Runtime CPU latency of converted vs original models, and export time.

Writes benchmarks/results/onnx.json. Not a test. For a Llama-style decoder
(``attnres_rewrite.samples.llama``) at two sizes it exports, with ``attnres_rewrite.export_onnx``
(verification on):

* ``original``: the unconverted model;
* ``converted``: Block AttnRes (``num_blocks`` blocks, ``paper`` mode), inline form;
* ``converted_function``: the same, with each aggregation as an ``attnres`` ONNX function
  call (``BlockAttnRes``, with the RMSNorm it feeds ``BlockAttnResRMSNorm``, and the
  ``Partial`` forms; see ``attnres_rewrite.onnx.fusions``; onnxruntime inlines functions
  when it loads a model);
* ``converted_function_fused``: the ``converted_function`` file in a session with the
  attnres op library registered (``attnres_rewrite.onnx.ort_ops``): each call is one
  fused CPU kernel instead of the inlined body (skipped, with a note, where the library
  cannot be built);

then times ``InferenceSession.run`` on the CPU provider (median over ``--iters`` runs
after ``--warmup``, fixed ``--threads``; variants are timed in interleaved rounds).
Export time is ``ExportReport.export_seconds`` (capture, translation, optimisation,
save; the very first export of a process also builds the exporter's op registry);
verification (onnxruntime vs PyTorch on new shapes) is reported separately, as is the
whole ``export_onnx`` call (which adds ``onnx.checker``).

The machine this runs on may be shared: the JSON records the load average before and
after; absolute figures are then inflated, and only the interleaved ratios
(``latency_vs_original``) are meaningful.

It also counts the ONNX nodes of the AttnRes part: the graph nodes the conversion
adds (converted minus original, inline form), and with the functions the graph nodes
against the original's (fewer: a call also stands for the norm it feeds), the calls of
each function and the nodes of each body.

``decode`` (skipped with ``--no-decode``): per-token cost with the KV cache. The sample
has no cache, so a Hugging Face ``LlamaForCausalLM`` of the sample's shape (same dim,
layers, heads, SwiGLU width, random weights) is exported with
``export_decoder_with_past`` (``--task text-generation-with-past``), original and
converted, and timed on a prefill (empty past, ``seq`` tokens) and on one decode step
(one token after a past of ``seq``), at ``--decode-sizes`` (default up to d = 512),
in the same variants (the function form exported with ``as_function=True``).
Target: converted/original <= 1.05 for decode.

The converted models get non-zero AttnRes parameters first (as after fine-tuning): a
fresh conversion's zero queries let the exporter fold every aggregation's query
column into one shared constant, which would time a graph no trained model has.

Usage: ``python benchmarks/onnx.py`` (short default, a few minutes on two idle
cores); ``--sizes 512x12x256`` (dim x layers x seq) for larger models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, this file's directory is sys.path[0], and this file is named onnx.py:
# every later ``import onnx`` (by onnxscript, torch.onnx, attnres_rewrite.onnx) would
# import this script instead of the ONNX library. Drop that entry before anything
# imports onnx.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import attnres_rewrite  # noqa: E402
from attnres_rewrite import samples  # noqa: E402
from attnres_rewrite.onnx import ort_ops  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "onnx.json"
VARIANTS = ("original", "converted", "converted_function")
FUSED = "converted_function_fused"


def _parse_size(text: str) -> tuple[int, int, int]:
    dim, layers, seq = (int(x) for x in text.lower().split("x"))
    return dim, layers, seq


def _session(path: str, threads: int, fused: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if fused:
        ort_ops.register(options)
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def _add_fused(sessions: dict, path: Path, threads: int) -> None:
    """The function-form file with the op library registered, where it builds."""
    if ort_ops.available():
        sessions[FUSED] = _session(str(path), threads, fused=True)
    else:
        print(f"no {FUSED} variant: {ort_ops.unavailable_reason()}", flush=True)


def _interleaved_ms(sessions: dict, feed: dict, warmup: int, iters: int, chunk: int = 3) -> dict:
    """Per-variant run times (ms), measured in interleaved rounds.

    The machine is shared: load drifts over seconds. Timing variant A fully, then B,
    would charge the drift to whichever ran during the busy part; alternating small
    chunks spreads it evenly, so the ratio of medians is fair even when the absolute
    figures are inflated.
    """
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times = {name: [] for name in sessions}
    while min(len(t) for t in times.values()) < iters:
        for name, session in sessions.items():
            for _ in range(chunk):
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10)
    return {"median": round(statistics.median(times), 3), "p10": round(q[0], 3), "p90": round(q[-1], 3)}


def bench_size(dim: int, layers: int, seq: int, args, workdir: Path) -> dict:
    heads = max(1, dim // 32)
    model, example = samples.get("llama", dim=dim, layers=layers, heads=heads, hidden=int(dim * 8 / 3), seq=16)
    num_blocks = min(args.num_blocks, 2 * layers)
    converted = _trained(attnres_rewrite.convert(model, example, num_blocks=num_blocks))
    ids = torch.randint(0, 97, (args.batch, seq), generator=torch.Generator().manual_seed(0))
    result = {
        "dim": dim,
        "layers": layers,
        "sublayers": 2 * layers,
        "num_blocks": num_blocks,
        "batch": args.batch,
        "seq": seq,
        "export_example_shape": list(example[0].shape),
        "params_original": sum(p.numel() for p in model.parameters()),
        "params_converted": sum(p.numel() for p in converted.parameters()),
        "variants": {},
    }
    sessions, paths = {}, {}
    for variant in VARIANTS:
        net = model if variant == "original" else converted
        path = paths[variant] = workdir / f"{variant}_{dim}x{layers}.onnx"
        start = time.perf_counter()
        report = attnres_rewrite.export_onnx(net, example, path, as_function=variant == "converted_function")
        total_s = time.perf_counter() - start
        sessions[variant] = _session(str(path), args.threads)
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(args.iters):
                net(ids)
            eager_ms = (time.perf_counter() - start) * 1e3 / args.iters
        result["variants"][variant] = {
            "export_seconds": round(report.export_seconds, 2),
            "verify_seconds": round(report.verify_seconds, 2),
            "export_onnx_total_seconds": round(total_s, 2),
            "verify_max_rel_diff": report.max_rel_diff,
            "onnx_file_bytes": report.file_bytes,
            "attnres_ops": report.attnres_ops,
            "pytorch_eager_latency_ms_mean": round(eager_ms, 3),
        }
        print(f"{dim}x{layers} seq {seq} {variant}: export {report.export_seconds:.1f} s", flush=True)
    result["onnx_nodes"] = _node_counts(paths)
    _add_fused(sessions, paths["converted_function"], args.threads)
    feed = {sessions["original"].get_inputs()[0].name: ids.numpy()}
    times = _interleaved_ms(sessions, feed, args.warmup, args.iters)
    base = statistics.median(times["original"])
    for variant in sessions:
        entry = result["variants"].setdefault(variant, {})
        entry["ort_cpu_latency_ms"] = _summary(times[variant])
        entry["latency_vs_original"] = round(statistics.median(times[variant]) / base, 3)
        print(f"{dim}x{layers} seq {seq} {variant}: ort {entry['ort_cpu_latency_ms']}", flush=True)
    return result


def _trained(converted: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Non-zero AttnRes parameters, as after fine-tuning (in place).

    A fresh conversion has zero queries: every aggregation then has the same constant
    query column, which the exporter's optimiser folds and shares, and every logit is 0.
    Timing that graph would flatter the converted model.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in converted.attnres.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return converted


def _node_counts(paths: dict[str, Path]) -> dict:
    """Nodes of the AttnRes part: inline (converted - original) and as functions (calls + each body).

    With the functions the graph can have fewer nodes than the original's: each
    ``BlockAttnResRMSNorm`` call also stands for the RMSNorm it feeds.
    """
    import collections

    import onnx

    protos = {k: onnx.load(str(p), load_external_data=False) for k, p in paths.items()}
    total = {k: len(m.graph.node) for k, m in protos.items()}
    function = protos["converted_function"]
    calls = collections.Counter(n.op_type for n in function.graph.node if n.domain == "attnres")
    body = {f.name: len(f.node) for f in function.functions if f.domain == "attnres"}
    return {
        "graph_nodes": total,
        "attnres_inline_nodes": total["converted"] - total["original"],
        "attnres_function_graph_nodes": total["converted_function"] - total["original"],
        "attnres_function_calls": dict(calls),
        "attnres_function_body_nodes": body,
    }


def bench_decode(dim: int, layers: int, seq: int, args, workdir: Path) -> dict:
    """Prefill and one decode step with the KV cache, original vs converted (module docstring)."""
    import numpy as np
    import onnx
    import transformers as T

    from attnres_rewrite.onnx.decoder import export_decoder_with_past

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    heads = max(1, dim // 32)
    cfg = T.LlamaConfig(
        vocab_size=97, hidden_size=dim, intermediate_size=int(dim * 8 / 3), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, use_cache=False,
    )  # fmt: skip
    model = T.LlamaForCausalLM(cfg).eval()
    num_blocks = min(args.num_blocks, 2 * layers)
    example = {"input_ids": torch.randint(0, 97, (args.batch, 16))}
    converted = _trained(attnres_rewrite.convert(model, example, num_blocks=num_blocks))
    sessions, result = {}, {"dim": dim, "layers": layers, "seq": seq, "batch": args.batch, "variants": {}}
    for variant in VARIANTS:
        net = model if variant == "original" else converted
        path = workdir / f"decode_{variant}_{dim}x{layers}.onnx"
        function = variant == "converted_function"
        report = export_decoder_with_past(net, path, require_attnres=variant != "original", as_function=function)
        sessions[variant] = _session(str(path), args.threads)
        result["variants"][variant] = {
            "verify_max_rel_diff": report.max_rel_diff,
            "attnres_ops": report.attnres_ops,
            "graph_nodes": len(onnx.load(str(path), load_external_data=False).graph.node),
            "verified_on": report.providers,
        }
        if function:
            _add_fused(sessions, path, args.threads)
    head_dim = dim // heads
    ids = np.random.default_rng(0).integers(0, 97, (args.batch, seq), dtype=np.int64)
    past_names = [i.name for i in sessions["original"].get_inputs()[3:]]

    def feed(tokens: int, past: int) -> dict:
        out = {
            "input_ids": ids[:, :tokens],
            "attention_mask": np.ones((args.batch, past + tokens), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + tokens), (args.batch, tokens)).copy(),
        }
        shape = (args.batch, heads, past, head_dim)
        out.update({n: np.random.default_rng(1).standard_normal(shape).astype(np.float32) for n in past_names})
        return out

    for phase, f in (("prefill", feed(seq, 0)), ("decode", feed(1, seq))):
        times = _interleaved_ms(sessions, f, args.warmup, args.iters)
        base = statistics.median(times["original"])
        for variant in sessions:
            entry = result["variants"].setdefault(variant, {})
            entry[f"{phase}_ort_cpu_latency_ms"] = _summary(times[variant])
            entry[f"{phase}_latency_vs_original"] = round(statistics.median(times[variant]) / base, 3)
            print(f"decode bench {dim}x{layers} {phase} {variant}: {entry[f'{phase}_ort_cpu_latency_ms']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x4x64,192x8x128", help="dim x layers x seq, comma separated")
    parser.add_argument(
        "--decode-sizes", default="64x4x64,192x8x128,512x8x128", help="dim x layers x past for the KV-cache part"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=45)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="skip the KV-cache benchmark")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_size(*_parse_size(s), args, Path(tmp)) for s in args.sizes.split(",")]
        decode = (
            [bench_decode(*_parse_size(s), args, Path(tmp)) for s in args.decode_sizes.split(",")]
            if args.decode
            else []
        )
    report = {
        "benchmark": "onnxruntime CPU latency, converted vs original (attnres_rewrite.samples.llama), and export time",
        "environment": {
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "opset": attnres_rewrite.onnx.DEFAULT_OPSET,
            "attnres_ort_ops": ort_ops.unavailable_reason() or "available",
        },
        "settings": {"warmup": args.warmup, "iters": args.iters, "batch": args.batch, "num_blocks": args.num_blocks},
        "results": results,
        "decode_with_kv_cache": decode,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
