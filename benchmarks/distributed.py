"""Distributed-training benchmark: activation memory with per-layer checkpointing, pipeline bytes per micro-batch.

Writes JSON (default ``benchmarks/results/distributed.json``):

* ``memory``: the ``samples`` Llama (``--layers`` layers, width ``--dim``) and its Block
  AttnRes conversions (``exact`` mode, several block counts), each trained for one step
  with and without ``checkpoint_wrapper`` on every layer, batch ``--batch`` x
  ``--seq`` tokens, fp32. Measured with ``torch.distributed._tools.mem_tracker.MemTracker``
  (a dispatch mode that follows every tensor storage on any device, CPU included):
  ``activations_after_forward`` (bytes the forward leaves alive for the backward),
  ``peak_minus_weights`` (peak bytes during forward + backward, parameters and
  buffers excluded: activations, temporaries, gradients) and, for reference,
  ``block_state_bytes``: the Block AttnRes state at the last layer (``N`` completed
  blocks plus one partial sum, ``B x T x d`` each), what a converted model keeps alive
  across layers by design;
* ``pipeline``: bytes sent per micro-batch across stage boundaries by
  :mod:`attnres_rewrite.distributed.pipeline`, ``cached`` (each completed block once
  per pair of ranks) against ``resend`` (the whole live state at every boundary), for
  virtual stages looped over 2 and 4 ranks; from the stage modules run in one process
  (:meth:`PipelineSplit.run_locally`, the same stage graphs ``torch.distributed.pipelining``
  runs), so the figures are the tensors' sizes, not a network measurement. Backward
  sends the same sizes back (one gradient per tensor sent).

Usage: ``python benchmarks/distributed.py [--memory] [--pipeline] [--out PATH]``
(both by default; a few minutes on a 2-core CPU, most of it capturing programs).
Timings are not measured: memory and bytes are deterministic, CPU seconds here would say
nothing about GPUs.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite import distributed as ard
from attnres_rewrite import samples
from attnres_rewrite.distributed.pipeline import split_pipeline

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
VOCAB = 97


def _model(layers: int, dim: int) -> nn.Module:
    model, _ = samples.get(
        "llama", layers=layers, dim=dim, hidden=round(8 * dim / 3), heads=max(dim // 64, 1), dropout=0.0
    )
    return model.train()


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def _checkpointed_original(model: nn.Module) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, layer in enumerate(list(model.layers)):
        model.layers[i] = checkpoint_wrapper(layer)
    return model


def _measure(model: nn.Module, ids: torch.Tensor) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    model(ids[:2])  # capture outside the tracker (a converted model's first call of this kind)
    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = _loss(model, ids)
        after = dict(tracker.get_tracker_snapshot("current")[ids.device])
        loss.backward()
    peak = dict(tracker.get_tracker_snapshot("peak")[ids.device])
    weights = {"Parameter", "Buffer"}
    return {
        "activations_after_forward": sum(v for k, v in after.items() if k != "Total" and k.value not in weights),
        "peak_minus_weights": sum(v for k, v in peak.items() if k != "Total" and k.value not in weights),
        "peak_total": peak["Total"],
        "parameters": peak[next(k for k in peak if k != "Total" and k.value == "Parameter")],
    }


def memory(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    original = _model(args.layers, args.dim)
    ids = torch.randint(1, VOCAB, (args.batch, args.seq))
    example = (ids[:2, :8],)
    state_unit = args.batch * args.seq * args.dim * 4
    rows = []
    for blocks in [None, *args.blocks]:
        if blocks is None:
            label, base = "original", original
        else:
            label = f"block AttnRes, {blocks} blocks"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = ar.convert(original, example, num_blocks=blocks, mode="exact")
        for checkpointed in (False, True):
            model = copy.deepcopy(base)
            if checkpointed:
                model = ard.checkpoint_layers(model) if blocks is not None else _checkpointed_original(model)
            row = {"model": label, "blocks": blocks, "checkpointed_layers": checkpointed, **_measure(model, ids)}
            if blocks is not None:
                row["block_state_bytes"] = (blocks + 1) * state_unit  # b_0..b_{N-1} and the last partial sum
            rows.append(row)
            print(
                f"{label:28s} checkpointed={checkpointed!s:5s}  activations after forward "
                f"{row['activations_after_forward'] / 2**20:7.1f} MiB  peak (no weights) "
                f"{row['peak_minus_weights'] / 2**20:7.1f} MiB",
                flush=True,
            )
    return {
        "config": {"layers": args.layers, "dim": args.dim, "batch": args.batch, "seq": args.seq, "dtype": "float32"},
        "hidden_state_bytes": state_unit,
        "rows": rows,
    }


def pipeline(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    layers, dim = args.pipe_layers, args.pipe_dim
    original = _model(layers, dim)
    ids = torch.randint(1, VOCAB, (args.micro_batch, args.pipe_seq))
    unit = args.micro_batch * args.pipe_seq * dim * 4
    rows = []
    for blocks in args.pipe_blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = ar.convert(original, (ids[:, :8],), num_blocks=blocks, mode="exact")
        for stages, world in args.layouts:
            boundaries = [layers * k // stages for k in range(1, stages)]
            for scheme in ("cached", "resend"):
                split = split_pipeline(copy.deepcopy(converted), (ids,), boundaries=boundaries, world_size=world,
                                       scheme=scheme)  # fmt: skip
                (_, loss), carried = split.run_locally((ids,), ids, lambda out, t: F.cross_entropy(
                    out[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1)))  # fmt: skip
                rows.append(
                    {
                        "blocks": blocks,
                        "stages": stages,
                        "ranks": world,
                        "scheme": scheme,
                        "bytes_per_boundary": carried,
                        "tensors_per_boundary": [len(s.inputs) for s in split.stages[1:]],
                        "total_bytes": sum(carried),
                        "total_in_hidden_states": sum(carried) / unit,
                        "loss": loss.item(),
                    }
                )
            cached, resend = rows[-2], rows[-1]
            print(
                f"{blocks} blocks, {stages} stages on {world} ranks: cached {cached['total_in_hidden_states']:.0f} "
                f"hidden states per micro-batch, resend {resend['total_in_hidden_states']:.0f}",
                flush=True,
            )
    return {
        "config": {"layers": layers, "dim": dim, "micro_batch": args.micro_batch, "seq": args.pipe_seq},
        "hidden_state_bytes": unit,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", action="store_true")
    p.add_argument("--pipeline", action="store_true")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--pipe-layers", type=int, default=16)
    p.add_argument("--pipe-dim", type=int, default=64)
    p.add_argument("--pipe-seq", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--pipe-blocks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.layouts = [(2, 2), (4, 2), (8, 2), (8, 4)]  # (stages, ranks): virtual stages looped over the ranks
    if not (args.memory or args.pipeline):
        args.memory = args.pipeline = True
    torch.set_num_threads(1)
    out: dict = {
        "benchmark": "distributed",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
    }
    if args.memory:
        out["memory"] = memory(args)
    if args.pipeline:
        out["pipeline"] = pipeline(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
