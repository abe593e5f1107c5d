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
    layers_per_block: int | None = None,
    trace_depth: str = "auto",
    batch: int | None,
    seq_len: int | None,
    seed: int,
    as_json: bool,
) -> None:
    common.ConversionOptions(blocks, block_size, full, layers_per_block=layers_per_block)  # validates the combination
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    api = common.backend("api")
    with output.step("Tracing and detecting residual streams"):
        report = api.inspect(resolved.model, resolved.example_inputs, trace_depth=trace_depth)
    payload: dict[str, Any] = {"model": spec, **report.to_dict()}
    if blocks or block_size or full or layers_per_block:  # preview another partition than convert's default
        from attnres_rewrite.passes.plan import layer_partition, resolve_partition

        for stream in payload["streams"]:
            if stream["convertible"]:
                stream["blocks"] = (
                    layer_partition(stream["sublayers"], layers_per_block, stream["name"])
                    if layers_per_block
                    else resolve_partition(stream["num_sublayers"], blocks, block_size, full, stream["name"])
                )
                stream["num_blocks"] = len(stream["blocks"])
    if payload["static_axes"]:
        output.warn(
            f"the model's code fixes input axes ({', '.join(payload['static_axes'])}): a converted model traces "
            "again for each other size there, and an ONNX export keeps them static"
        )
    if as_json:
        output.emit_json(payload)
        return
    streams = payload["streams"]
    output.table(
        f"Residual streams of {spec}",
        ["stream", "kind", "convertible", "sublayers", "blocks", "reason"],
        [[s["name"], s["kind"], s["convertible"], s["num_sublayers"], _partition(s), s["reason"]] for s in streams],
    )
    for line in payload.get("notes", []):
        output.note(line)
    if payload.get("skipped"):
        output.note(f"{len(payload['skipped'])} single residual add(s) skipped (not streams); see --json")
    if not any(s["convertible"] for s in streams):
        output.note("no convertible stream: `attnres convert` would refuse this model (see the reasons above).")


def _partition(stream: dict[str, Any]) -> str | None:
    """Block sizes as ``3: 2+2+2`` (count: sublayers per block), for convertible streams.

    With ``--layers-per-block`` each block holds whole layers, so the sizes are
    multiples of the sublayers per layer (``2: 4+4`` for 2 layers of attention + MLP).
    """
    if not stream["convertible"] or not stream.get("blocks"):
        return None
    sizes = [stop - start for start, stop in stream["blocks"]]
    return f"{len(sizes)}: " + "+".join(str(n) for n in sizes)
