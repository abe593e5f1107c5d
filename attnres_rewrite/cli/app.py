"""The ``attnres`` command line: inspect, convert, export, ort-ops, verify, bench.

This module only declares the commands and their flags; each command's work lives in
``commands/`` and everything shared (model sources, conversion, output, errors) in the
sibling modules. Every command is wrapped by :func:`.guard.guarded`, which turns user
mistakes into one line on stderr and exit code 2 (see docs/cli.md for all exit codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import config as config_file
from . import options as o
from .guard import guarded

app = typer.Typer(
    name="attnres",
    help="Rewrite the residual streams of PyTorch models into Block Attention Residuals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # guard.py decides what a user sees; never a rich traceback dump
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        import torch

        from attnres_rewrite import __version__

        typer.echo(f"attnres {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="ATTNRES_CONFIG",
            metavar="FILE.toml",
            help="TOML file of option defaults: top-level keys apply to all commands, a table per command to one.",
        ),
    ] = None,
    debug: o.Debug = False,
) -> None:
    """Rewrite the residual streams of PyTorch models into Block Attention Residuals.

    MODEL is samples:NAME, a local Hugging Face model directory, or package.module:factory.
    Nothing is ever downloaded and no remote code is run.
    """
    if config is not None:
        ctx.default_map = config_file.default_map(config, ctx.command, ctx)


@app.command()
@guarded
def inspect(
    ctx: typer.Context,
    model: o.ModelArg,
    blocks: o.Blocks = None,
    block_size: o.BlockSize = None,
    full: o.Full = False,
    layers_per_block: o.LayersPerBlock = None,
    trace_depth: o.TraceDepthOpt = o.TraceDepth.auto,
    batch: o.Batch = None,
    seq_len: o.SeqLen = None,
    seed: o.Seed = 0,
    json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """List residual streams: kind, convertible, sublayers, reason, and the block partition convert would use."""
    from .commands import inspecting

    inspecting.run(
        model,
        blocks=blocks,
        block_size=block_size,
        full=full,
        layers_per_block=layers_per_block,
        trace_depth=trace_depth.value,
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        as_json=json,
    )


@app.command()
@guarded
def convert(
    ctx: typer.Context,
    model: o.ModelArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="DIR", help="Adapter directory to write.", show_default=False)
    ],
    blocks: o.Blocks = None,
    block_size: o.BlockSize = None,
    full: o.Full = False,
    layers_per_block: o.LayersPerBlock = None,
    mode: o.ModeOpt = o.Mode.paper,
    eps: o.Eps = None,
    trace_depth: o.TraceDepthOpt = o.TraceDepth.auto,
    force: o.Force = False,
    whole_model: Annotated[
        bool,
        typer.Option(
            "--whole-model/--adapter-only",
            help="Also write the whole converted model (all weights, safetensors) to DIR: "
            "attnres_rewrite.load_converted(DIR) loads it in one call.",
        ),
    ] = False,
    check_inputs: Annotated[
        Path | None,
        typer.Option(
            "--check-inputs",
            metavar="FILE.safetensors",
            help="Inputs for the equivalence check instead of resampled ones: tensors named by forward's "
            "keywords (input_ids, pixel_values, ...) or 0, 1, ... for positional arguments.",
            show_default=False,
        ),
    ] = None,
    write_on_failed_check: Annotated[
        bool,
        typer.Option(
            "--write-on-failed-check",
            help="Write DIR even when the equivalence check fails or is inconclusive (default: exit 1, "
            "nothing written).",
        ),
    ] = False,
    batch: o.Batch = None,
    seq_len: o.SeqLen = None,
    seed: o.Seed = 0,
    json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """Convert, verify equivalence on fresh inputs, and write the adapter plus report.json to DIR."""
    from .commands import converting
    from .common import ConversionOptions

    options = ConversionOptions(
        blocks, block_size, full, mode.value, eps, trace_depth.value, layers_per_block=layers_per_block
    )
    converting.run(
        model,
        output,
        options,
        force=force,
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        as_json=json,
        whole_model=whole_model,
        check_inputs=check_inputs,
        write_on_failed_check=write_on_failed_check,
    )


@app.command()
@guarded
def export(
    ctx: typer.Context,
    model: o.ModelArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE.onnx|DIR",
            help="ONNX file to write; with a -with-past --task, a directory (model.onnx, or encoder_model.onnx, "
            "decoder_model.onnx and decoder_with_past_model.onnx inside).",
            show_default=False,
        ),
    ],
    adapter: o.Adapter = None,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="default: the model's forward on its example; text-generation-with-past: a Hugging Face causal LM "
            "with its KV cache, under optimum's input and output names; text2text-generation-with-past: an "
            "encoder-decoder LM (T5) as optimum's encoder, decoder and decoder-with-past files.",
        ),
    ] = "default",
    opset: Annotated[int | None, typer.Option(min=1, help="ONNX opset (default: the exporter's).")] = None,
    function: Annotated[
        bool, typer.Option("--function/--no-function", help="Wrap AttnRes as an ONNX function in domain attnres.")
    ] = False,
    dynamic: Annotated[bool, typer.Option("--dynamic/--static", help="Dynamic batch and sequence axes.")] = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check the file in onnxruntime.")] = True,
    blocks: o.Blocks = None,
    block_size: o.BlockSize = None,
    full: o.Full = False,
    layers_per_block: o.LayersPerBlock = None,
    mode: o.ModeOpt = o.Mode.paper,
    eps: o.Eps = None,
    force: o.Force = False,
    batch: o.Batch = None,
    seq_len: o.SeqLen = None,
    seed: o.Seed = 0,
    json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """Export the converted model (from --adapter, or converted on the fly) to ONNX and verify it in onnxruntime."""
    from .commands import exporting
    from .common import ConversionOptions

    options = ConversionOptions(blocks, block_size, full, mode.value, eps, layers_per_block=layers_per_block)
    exporting.run(
        model,
        output,
        adapter=adapter,
        options=options,
        task=task,
        opset=opset,
        as_function=function,
        dynamic=dynamic,
        verify=verify,
        force=force,
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        as_json=json,
    )


@app.command("ort-ops")
@guarded
def ort_ops(
    ctx: typer.Context,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", metavar="FILE.so", help="Library file to write.", show_default=False),
    ],
    force: o.Force = False,
    json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """Write the onnxruntime library that runs each attnres call (export --function) as one fused CPU kernel."""
    from .commands import exporting

    exporting.write_ort_ops(output, force=force, as_json=json)


@app.command()
@guarded
def verify(
    ctx: typer.Context,
    model: o.ModelArg,
    adapter: Annotated[
        Path,
        typer.Option("--adapter", "-a", help="Adapter directory written by `attnres convert`.", show_default=False),
    ],
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            metavar="FILE.onnx|DIR",
            help="Also check this exported file (a -with-past --task directory: also greedy tokens).",
            show_default=False,
        ),
    ] = None,
    atol: o.Atol = None,
    rtol: o.Rtol = None,
    batch: o.Batch = None,
    seq_len: o.SeqLen = None,
    seed: o.Seed = 0,
    json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """Re-check a saved adapter (and an exported ONNX file) against MODEL; exit code 1 if a check fails."""
    from .commands import verifying

    verifying.run(
        model, adapter, onnx_path=onnx, atol=atol, rtol=rtol, batch=batch, seq_len=seq_len, seed=seed, as_json=json
    )


@app.command()
@guarded
def bench(
    ctx: typer.Context,
    model: o.ModelArg,
    adapter: o.Adapter = None,
    train: Annotated[
        bool,
        typer.Option("--train", help="Also time a training step (forward, backward, SGD), both models in eval mode."),
    ] = False,
    compiled: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile", help="Also time torch.compile (original: inductor, converted: attnres)."
        ),
    ] = True,
    iters: Annotated[int, typer.Option(min=1, help="Timed iterations per measurement.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed iterations before timing.")] = 2,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    blocks: o.Blocks = None,
    block_size: o.BlockSize = None,
    full: o.Full = False,
    layers_per_block: o.LayersPerBlock = None,
    mode: o.ModeOpt = o.Mode.paper,
    eps: o.Eps = None,
    batch: o.Batch = None,
    seq_len: o.SeqLen = None,
    seed: o.Seed = 0,
    json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """Time forward (and --train step) of the original vs the converted model, eager and compiled."""
    from .commands import benchmarking
    from .common import ConversionOptions

    options = ConversionOptions(blocks, block_size, full, mode.value, eps, layers_per_block=layers_per_block)
    benchmarking.run(
        model,
        adapter=adapter,
        options=options,
        train=train,
        compiled=compiled,
        iters=iters,
        warmup=warmup,
        device=device,
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        as_json=json,
    )


def main() -> None:
    """Console-script entry point (``attnres = attnres_rewrite.cli.app:main``)."""
    app(prog_name="attnres")


if __name__ == "__main__":
    main()
