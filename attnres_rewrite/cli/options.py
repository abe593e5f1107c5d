"""Option declarations shared by the commands, so every command spells a flag the same way."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Mode(str, Enum):
    """docs/spec.md section 1 init modes: ``paper`` (the formula) or ``exact`` (equal at conversion)."""

    paper = "paper"
    exact = "exact"


class TraceDepth(str, Enum):
    """How many layers of a repeated stack ``torch.export`` traces (see docs/architecture.md)."""

    auto = "auto"
    full = "full"
    sampled = "sampled"


MODEL_HELP = (
    "samples:NAME (llama, gpt2, parallel, vit, bert, resnet), a local Hugging Face model directory "
    "(config.json [+ *.safetensors]), or package.module:factory."
)
CONVERSION = "Conversion"
INPUTS = "Example inputs"

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP, show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (progress stays on stderr).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
Batch = Annotated[
    int | None, typer.Option("--batch", min=1, help="Batch size of the example inputs.", rich_help_panel=INPUTS)
]
SeqLen = Annotated[
    int | None,
    typer.Option("--seq-len", min=1, help="Sequence length of text example inputs.", rich_help_panel=INPUTS),
]
Seed = Annotated[
    int,
    typer.Option(
        help="Seed for random weights (configs without weights) and fresh check inputs.", rich_help_panel=INPUTS
    ),
]
Blocks = Annotated[
    int | None,
    typer.Option("--blocks", "-n", min=1, help="Number of blocks N (default 8).", rich_help_panel=CONVERSION),
]
BlockSize = Annotated[
    int | None,
    typer.Option(
        "--block-size", "-s", min=1, help="Sublayers per block S instead of --blocks.", rich_help_panel=CONVERSION
    ),
]
LayersPerBlock = Annotated[
    int | None,
    typer.Option(
        "--layers-per-block",
        "-l",
        min=1,
        help="Blocks of whole layers (attention and MLP of a layer stay in one block), instead of --blocks.",
        rich_help_panel=CONVERSION,
    ),
]
Full = Annotated[
    bool, typer.Option("--full", help="Full AttnRes (one block per sublayer).", rich_help_panel=CONVERSION)
]
ModeOpt = Annotated[
    Mode,
    typer.Option(
        "--mode",
        "-m",
        help="paper: the formula of docs/spec.md; exact: equal to the original at conversion.",
        rich_help_panel=CONVERSION,
    ),
]
Eps = Annotated[
    float | None,
    typer.Option(help="Key RMSNorm eps (default: the model's, else 1e-6).", rich_help_panel=CONVERSION),
]
TraceDepthOpt = Annotated[
    TraceDepth,
    typer.Option(
        "--trace-depth",
        help="full: trace every layer; sampled: trace layers 0, 1 and the last of each stack of identical layers "
        "and replicate (much faster on deep models; falls back to full with a note); auto: sampled only for "
        "weights on the meta device.",
        rich_help_panel=CONVERSION,
    ),
]
Adapter = Annotated[
    Path | None,
    typer.Option("--adapter", "-a", help="Adapter directory written by `attnres convert`.", show_default=False),
]


def _tolerance(value: float | None) -> float | None:
    """A tolerance is a finite number >= 0: a negative or NaN one would make every check fail."""
    if value is not None and not 0 <= value < math.inf:
        raise typer.BadParameter(f"{value} is not a tolerance; pass a finite number >= 0 (e.g. 1e-4).")
    return value


Atol = Annotated[
    float | None,
    typer.Option(help="Absolute tolerance of the checks, >= 0 (default depends on the check).", callback=_tolerance),
]
Rtol = Annotated[
    float | None,
    typer.Option(help="Relative tolerance of the checks, >= 0 (default depends on the check).", callback=_tolerance),
]
