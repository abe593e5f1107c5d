"""``attnres inspect``: the residual streams of MODEL, how they classify, how convert would split them.

Read-only: nothing is converted or written, so it is the first command to run on an
unknown model (and the cheapest way to learn why a stream is not convertible).
"""

from __future__ import annotations

from typing import Any

from .. import common, output


def run(
    spec: str,
    *,
    blocks: int | None,
    block_size: int | None,
    full: bool,
    batch: int | None,
    seq_len: int | None,
    seed: int,
    as_json: bool,
) -> None:
    options = common.ConversionOptions(blocks, block_size, full)
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    api = common.backend("api")
    with output.step("Tracing and detecting residual streams"):
        report = api.inspect(resolved.model, resolved.example_inputs, **common.partition_kwargs(api.inspect, options))
    payload: dict[str, Any] = {"model": spec, **report.to_dict()}
    if as_json:
        output.emit_json(payload)
        return
    streams = payload.get("streams", [])
    output.table(
        f"Residual streams of {spec}",
        ["stream", "kind", "convertible", "sublayers", "blocks", "reason"],
        [
            [s.get("name"), s.get("kind"), s.get("convertible"), s.get("sublayers"), _partition(s), s.get("reason")]
            for s in streams
        ],
    )
    if not any(s.get("convertible") for s in streams):
        output.note("no convertible stream: `attnres convert` would refuse this model (see the reasons above).")


def _partition(stream: dict[str, Any]) -> str | None:
    """Block sizes as ``4+4+2`` (what ``--blocks``/``--block-size`` would give), for convertible streams."""
    blocks = stream.get("blocks") or stream.get("partition")
    if not stream.get("convertible") or not blocks:
        return None
    sizes = [len(b) if isinstance(b, (list, tuple)) else b for b in blocks]
    return f"{len(sizes)}: " + "+".join(str(s) for s in sizes)
