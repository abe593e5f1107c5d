"""Conversion benchmark: trace / detect / rewrite times, and eager CPU forward overhead.

Writes JSON (default ``benchmarks/results/convert.json``):

* ``sweep``: a PreNorm toy stream (norm -> Linear -> GELU -> Linear per sublayer) with
  8, 32 and 200 sublayers (``--full``: also 64 and 128), built on ``meta``: seconds
  spent tracing (``torch.export``) with every layer traced (``trace_full_s``) and with
  the depth-sampled trace (``trace_sampled_s``: three layers traced, the rest
  replicated; the default on meta), detection, planning + rewrite, and graph sizes;
* ``meta_shapes`` (``--full``): Hugging Face Llama configs with the 7B and 70B shapes
  built on the ``meta`` device (no weights allocated), same phases, plus
  ``convert_s``: the whole ``attnres_rewrite.convert`` call as a user runs it;
* ``forward``: eager CPU forward time of the original model, of its exported (unconverted)
  graph module, and of the converted model (Llama sample, ``paper`` mode, default 8
  blocks), median over repeats, one thread.

Usage: ``python benchmarks/convert.py [--full] [--out PATH]``. The default run takes
well under two minutes on an idle 2-core machine; ``--full`` adds the 7B/70B traces.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from attnres_rewrite.api import build_plan, convert_captured
from attnres_rewrite.passes.capture import capture
from attnres_rewrite.passes.detect import detect
from attnres_rewrite.passes.rewrite import make_parameters, rewrite

RESULTS = Path(__file__).resolve().parent / "results" / "convert.json"


class Sublayer(nn.Module):
    """``x + f(norm(x))`` with an MLP ``f``: one PreNorm sublayer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.f = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.f(self.norm(x))


class ToyStream(nn.Module):
    """``L`` PreNorm MLP sublayers on a width-``d`` stream (cheap to trace, realistic op mix)."""

    def __init__(self, sublayers: int, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, dim)
        self.layers = nn.ModuleList(Sublayer(dim) for _ in range(sublayers))
        self.final = nn.LayerNorm(dim)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.final(x)


def phases(model: nn.Module, inputs) -> dict:
    """Time each conversion phase once (tracing dominates and is deterministic enough)."""
    t0 = time.perf_counter()
    full = capture(model, inputs, trace_depth="full")
    t1 = time.perf_counter()
    captured = capture(model, inputs, trace_depth="sampled")
    t2 = time.perf_counter()
    detection = detect(captured.module, model)
    t3 = time.perf_counter()
    plan = build_plan(detection)
    rewrite(captured.module, detection, plan, make_parameters(plan, detection))
    t4 = time.perf_counter()
    stream = plan.streams[0]
    return {
        "sublayers": stream.num_sublayers,
        "dim": stream.dim,
        "blocks": stream.num_blocks,
        "graph_nodes": len(full.module.graph.nodes),
        "sampled": bool(captured.sampled),
        "trace_full_s": round(t1 - t0, 3),
        "trace_sampled_s": round(t2 - t1, 3),
        "detect_s": round(t3 - t2, 4),
        "rewrite_s": round(t4 - t3, 4),
    }


def sweep(sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        with torch.device("meta"):
            model = ToyStream(n).eval()
        row = phases(model, (torch.zeros(2, 8, dtype=torch.long),))
        print(f"sweep L={n}: {row}", flush=True)
        out.append(row)
    return out


def meta_shapes() -> list[dict]:
    import transformers

    import attnres_rewrite as ar

    shapes = {
        "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "heads": 32, "kv": 32},
        "llama-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "heads": 64, "kv": 8},
    }
    out = []
    for name, s in shapes.items():
        cfg = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_hidden_layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv"],
            use_cache=False,
        )
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg).eval()
        inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
        row = {"model": name, **phases(model, inputs)}
        t = time.perf_counter()
        ar.convert(model, inputs)
        row["convert_s"] = round(time.perf_counter() - t, 3)
        row["parameters_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
        print(f"meta {row}", flush=True)
        out.append(row)
    return out


def _median_ms(fn, arg, repeats: int) -> float:
    fn(arg)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


@torch.no_grad()
def forward(configs: list[dict], repeats: int) -> list[dict]:
    from attnres_rewrite import samples

    out = []
    for cfg in configs:
        batch, seq = cfg.pop("batch"), cfg.pop("seq")
        model, inputs = samples.get("llama", dropout=0.0, **cfg)
        captured = capture(model, inputs)
        exported = captured.program.module()
        converted = convert_captured(captured)
        ids = torch.randint(0, 97, (batch, seq))
        orig_ms = _median_ms(model, ids, repeats)
        exported_ms = _median_ms(exported, ids, repeats)
        conv_ms = _median_ms(converted, ids, repeats)
        row = {
            **cfg,
            "batch": batch,
            "seq": seq,
            "sublayers": converted.attnres.plan.streams[0].num_sublayers,
            "blocks": converted.attnres.plan.streams[0].num_blocks,
            "original_ms": orig_ms,
            "original_exported_ms": exported_ms,
            "converted_ms": conv_ms,
            "overhead": round(conv_ms / orig_ms - 1.0, 4),
        }
        print(f"forward {row}", flush=True)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also trace the 7B and 70B Llama shapes on meta")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {
        "benchmark": "convert",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "note": "wall-clock on a shared CPU machine; trace time is torch.export and dominates",
        "sweep": sweep([8, 32, 64, 128, 200] if args.full else [8, 32, 200]),
        "meta_shapes": meta_shapes() if args.full else [],
        "forward": forward(
            [
                {"dim": 128, "layers": 4, "heads": 4, "hidden": 352, "batch": 4, "seq": 128},
                {"dim": 256, "layers": 8, "heads": 8, "hidden": 688, "batch": 4, "seq": 128},
                {"dim": 256, "layers": 16, "heads": 8, "hidden": 688, "batch": 2, "seq": 256},
            ],
            args.repeats,
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
