"""The converted model in use: capture cost per call signature, steady-state overhead, cached decoding.

Writes JSON (default ``benchmarks/results/generate.json``) for a Hugging Face Llama
built from a config with random weights (nothing downloaded), converted in ``exact`` mode:

* ``capture``: seconds of the first call of each signature (a torch.export trace, a
  rewrite, an outline), in the order ``generate`` meets them: a forward with a mask, the
  prefill (an empty cache), a decode step (one token, a cache);
* ``steady``: forward time of the converted model over the original's (B=2, T=32) and
  one decode step over the original's, once every program exists; medians of
  interleaved repeats;
* ``decode``: time per generated token with the KV cache at prefix 16 and prefix 512,
  for the original and the converted model (medians of ``--repeats`` interleaved runs
  of 16 steps); with the cache the converted model's
  decode step costs the same at both prefix lengths, up to attention over the longer
  cache (the original's own ratio is the reference).

Usage: ``python benchmarks/generate.py [--layers 4] [--dim 64] [--repeats 15] [--out PATH]``.
The default run takes about a minute on an idle 2-core machine (most of it captures).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

import attnres_rewrite as ar

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"


def build(layers: int, dim: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        use_cache=True,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def decode_step_times(models: list, prefix: int, steps: int, repeats: int) -> list[float]:
    """Median seconds of one cached decode step after a prefill of ``prefix`` tokens, per model.

    The models take turns within each repeat, so a change in the machine's load hits
    all of them alike.
    """
    import transformers

    ids = torch.randint(1, 256, (1, prefix))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, out_times in zip(models, times):
            cache = transformers.DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            out_times.append((time.perf_counter() - start) / steps)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def interleaved(a, b, repeats: int) -> tuple[float, float]:
    """Medians of ``a()`` and ``b()`` timed in alternation (load drifts hit both alike)."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    original = build(args.layers, args.dim)
    ids = torch.randint(1, 256, (2, 32))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        converted = ar.convert(original, {"input_ids": ids, "attention_mask": mask}, mode="exact", num_blocks=2)
        convert_s = time.perf_counter() - start
        capture = {"convert_s": round(convert_s, 3)}
        with torch.no_grad():
            capture["forward_first_call_s"] = round(timed(lambda: converted(input_ids=ids, attention_mask=mask)), 3)
            import transformers

            cache = transformers.DynamicCache(config=converted.config)
            capture["prefill_first_call_s"] = round(
                timed(lambda: converted(input_ids=ids[:1, :16], cache=cache, use_cache=True)), 3
            )
            token = ids[:1, :1]
            capture["decode_first_call_s"] = round(
                timed(lambda: converted(input_ids=token, cache=cache, use_cache=True)), 3
            )
            capture["decode_second_call_s"] = round(
                timed(lambda: converted(input_ids=token, cache=cache, use_cache=True)), 3
            )
        # every signature below exists now: the rest is steady state
        fwd_o, fwd_c = interleaved(
            lambda: original(input_ids=ids, attention_mask=mask),
            lambda: converted(input_ids=ids, attention_mask=mask),
            args.repeats,
        )
        decode = {}
        for prefix in (16, 512):
            reference = copy.deepcopy(original)
            original_s, converted_s = decode_step_times([reference, converted], prefix, 16, args.repeats)
            decode[prefix] = {"original_s": original_s, "converted_s": converted_s}
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "model": {"family": "LlamaForCausalLM", "layers": args.layers, "dim": args.dim, "mode": "exact", "blocks": 2},
        "capture": capture,
        "programs": {path: [p.signature for p in ps] for path, ps in ar.api.programs(converted).items()},
        "steady": {
            "forward_B2_T32": {"original_s": fwd_o, "converted_s": fwd_c, "ratio": fwd_c / fwd_o},
        },
        "decode": {
            str(prefix): {**row, "ratio": row["converted_s"] / row["original_s"]} for prefix, row in decode.items()
        },
        "decode_prefix_512_over_16": {
            "original": decode[512]["original_s"] / decode[16]["original_s"],
            "converted": decode[512]["converted_s"] / decode[16]["converted_s"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
