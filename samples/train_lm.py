"""Does AttnRes help? A byte-level language-model study on the Python standard library.

Run ``python -m samples.train_lm`` (defaults: about 10-20 minutes on a 2-core CPU) or
``python -m samples.train_lm --quick`` (a smoke run, well under a minute on an idle
machine). Every ``StudyConfig`` field is a flag (``--layers 12 --dim 512 --steps 5000``);
``--device cuda`` is wired through but has not been run on a GPU yet.

What it does, per seed (same initial weights and same data order for every variant):

1. build the ``samples`` Llama-style decoder (the baseline, standard residual);
2. convert copies of those initial weights with :func:`attnres_rewrite.convert` into
   Block AttnRes (``paper`` mode, ``--num-blocks`` blocks) and Full AttnRes (each kind
   is traced once; later seeds load their weights into that graph, see :class:`Variants`);
3. train all three on the same windows in the same order, evaluating on held-out
   stdlib files; then probe the trained models (depth-attention weights, per-sublayer
   magnitudes and gradient norms).

Then a retrofit experiment: the trained seed-0 baseline is converted in ``exact`` mode
(equal to the baseline at conversion) and both are fine-tuned for the same steps.

Results (JSON) and plots (PNG) go to ``--out`` (default ``samples/results``); both are
written to a temporary file first and renamed, so a killed run never leaves a torn file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # ``python samples/train_lm.py``: make ``samples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samples import study_data as data  # noqa: E402
from samples import study_probe as probe  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_NAME = "train_lm.json"
VARIANTS = ("baseline", "block", "full")


@dataclass
class StudyConfig:
    """Everything that defines a run; recorded verbatim in the results JSON."""

    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    layers: int = 6  # transformer blocks; 2 sublayers each (12 sublayers, 4 blocks of 3)
    dim: int = 64
    heads: int = 4
    hidden: int = 176
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_windows: int = 64
    val_files: int = 40
    max_train_files: int | None = None
    num_blocks: int = 4
    retrofit_steps: int = 150
    retrofit_lr: float = 1e-3
    retrofit_seed: int = 1000
    probe_windows: int = 8
    threads: int = 1  # tiny ops: a 2nd thread gains little alone and stalls badly on a shared CPU
    device: str = "cpu"
    fixed_batch: bool = False  # every step reuses the first window batch (smoke tests: loss must fall)
    quick: bool = False


def quick_config(cfg: StudyConfig) -> StudyConfig:
    """Smoke-test sizes: a tiny model, a few steps, one seed, a slice of the corpus."""
    return dataclasses.replace(
        cfg,
        seeds=[0],
        layers=2,
        dim=32,
        heads=2,
        hidden=64,
        seq_len=32,
        batch_size=4,
        steps=6,
        warmup=2,
        eval_every=3,
        eval_windows=8,
        max_train_files=20,
        retrofit_steps=4,
        probe_windows=2,
        num_blocks=2,  # 4 sublayers: 2 blocks keeps Block distinct from Full
        quick=True,
    )


# --------------------------------------------------------------------------------------
# Models


def build_baseline(cfg: StudyConfig, seed: int) -> nn.Module:
    """The sample Llama decoder at the study's size; ``seed`` fixes its initial weights.

    Dropout is 0: the converted model is a graph captured once, and a fair comparison
    must not depend on train-mode behaviour that capture may have frozen.
    """
    from attnres_rewrite import samples

    model, _ = samples.get(
        "llama",
        vocab=256,
        dim=cfg.dim,
        layers=cfg.layers,
        heads=cfg.heads,
        hidden=cfg.hidden,
        dropout=0.0,
        batch=cfg.batch_size,
        seq=cfg.seq_len,
        seed=seed,
    )
    return model.to(cfg.device)


def convert_copy(model: nn.Module, example: Tensor, **kwargs: Any) -> nn.Module:
    """Convert a deep copy, so the baseline's own weights stay untouched and unshared."""
    import attnres_rewrite

    return attnres_rewrite.convert(copy.deepcopy(model), (example,), **kwargs)


CONVERT_OPTIONS = {
    "block": lambda cfg: {"num_blocks": cfg.num_blocks, "mode": "paper"},
    "full": lambda cfg: {"full": True, "mode": "paper"},
    "exact": lambda cfg: {"num_blocks": cfg.num_blocks, "mode": "exact"},
}


def convert_variant(name: str, model: nn.Module, example: Tensor, cfg: StudyConfig) -> nn.Module:
    """The model of study variant ``name`` built from ``model``'s current weights."""
    if name == "baseline":
        return copy.deepcopy(model)
    if name not in CONVERT_OPTIONS:
        raise ValueError(f"unknown variant {name!r}")
    return convert_copy(model, example, **CONVERT_OPTIONS[name](cfg))


class Variants:
    """Builds study variants, converting each kind once and reusing the graph.

    ``convert`` (a ``torch.export`` trace) costs tens of seconds on a small CPU, and
    the converted graph of one architecture does not depend on the weights. So each
    kind is converted once, from the first model it is asked for; later models get a
    deep copy of that converted graph with their own weights loaded by name (the
    original parameter names survive conversion; the new AttnRes parameters keep their
    init). :func:`samples.study_probe.init_checks` then measures, for every model
    built, its distance to the baseline it came from, so an identical start is checked,
    not assumed.
    """

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.templates: dict[str, nn.Module] = {}

    def build(self, name: str, model: nn.Module, example: Tensor) -> tuple[nn.Module, bool]:
        """``(variant model, whether convert ran now)`` carrying ``model``'s weights."""
        if name == "baseline" or name not in self.templates:
            built = convert_variant(name, model, example, self.cfg)
            if name != "baseline":
                self.templates[name] = copy.deepcopy(built)
            return built, name != "baseline"
        built = copy.deepcopy(self.templates[name])
        missing, unexpected = built.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("attnres.") for k in missing):
            raise RuntimeError(f"{name}: weights do not map onto the converted graph: {missing=} {unexpected=}")
        return built, False


# --------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on vectors (norm gains) or on AttnRes queries and key gains.

    Decaying the zero-initialised pseudo-queries would pull them back to the uniform
    average, i.e. against exactly what the study measures.
    """
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (keep if p.ndim < 2 or "attnres" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: nn.Module, val_x: Tensor, val_y: Tensor, batch_size: int) -> float:
    """Mean validation loss over the fixed windows (token-weighted; equal-size chunks)."""
    model.eval()
    losses = [data.lm_loss(model, x, y).item() for x, y in zip(val_x.split(batch_size), val_y.split(batch_size))]
    model.train()
    return sum(losses) / len(losses)


@dataclass
class Schedule:
    """Learning-rate schedule and evaluation cadence of one training run."""

    steps: int
    lr: float
    warmup: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    eval_every: int


class Run:
    """One model being trained: optimiser, curves and the time spent in its own steps."""

    def __init__(self, model: nn.Module, sched: Schedule, label: str) -> None:
        self.model, self.sched, self.label = model, sched, label
        self.opt = make_optimizer(model, sched.lr, sched.weight_decay)
        self.train_losses: list[float] = []
        self.curve: dict[str, list] = {"step": [], "val_loss": []}
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # process CPU time: less sensitive than wall time to a shared machine
        self.tokens = 0
        model.train()

    def step(self, step: int, x: Tensor, y: Tensor) -> None:
        """One optimisation step at the scheduled learning rate (timed)."""
        s = self.sched
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, s.steps, s.lr, s.warmup, s.min_lr_ratio)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = data.lm_loss(self.model, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.opt.step()
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        self.tokens += x.numel()
        self.train_losses.append(loss.item())

    def evaluate(self, step: int, val: tuple[Tensor, Tensor], batch_size: int) -> None:
        self.curve["step"].append(step)
        self.curve["val_loss"].append(evaluate(self.model, *val, batch_size))

    def result(self) -> dict:
        return {
            "train_loss": self.train_losses,
            "val": self.curve,
            "final_val_loss": self.curve["val_loss"][-1],
            "train_seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else float("nan"),
            "cpu_seconds": self.cpu_seconds,
            "tokens_per_cpu_s": self.tokens / self.cpu_seconds if self.cpu_seconds > 0 else float("nan"),
        }


def train_lockstep(
    runs: list[Run], train_data: Tensor, starts: Tensor, val: tuple[Tensor, Tensor], cfg: StudyConfig
) -> None:
    """Train several models on the same windows, one step of each in turn.

    Interleaving the variants step by step (rather than one run after the other) means
    they all see the same machine load, so their tokens/s stay comparable on a shared
    CPU; it changes nothing else (each model has its own optimiser and RNG-free data).
    """
    sched = runs[0].sched
    for run in runs:
        run.evaluate(0, val, cfg.batch_size)
    for step in range(sched.steps):
        x, y = (t.to(cfg.device) for t in data.windows(train_data, starts[step], cfg.seq_len))
        for run in runs:
            run.step(step, x, y)
        if (step + 1) % sched.eval_every == 0 or step + 1 == sched.steps:
            parts = []
            for run in runs:
                run.evaluate(step + 1, val, cfg.batch_size)
                parts.append(f"{run.label} {run.train_losses[-1]:.3f}/{run.curve['val_loss'][-1]:.3f}")
            print(f"  step {step + 1:4d}  (train/val) " + "  ".join(parts), flush=True)


def main_schedule(cfg: StudyConfig) -> Schedule:
    return Schedule(cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio, cfg.weight_decay, cfg.grad_clip, cfg.eval_every)


def retrofit_schedule(cfg: StudyConfig) -> Schedule:
    warmup = max(1, cfg.retrofit_steps // 10)
    every = max(1, min(cfg.eval_every, cfg.retrofit_steps // 6))
    return Schedule(
        cfg.retrofit_steps, cfg.retrofit_lr, warmup, cfg.min_lr_ratio, cfg.weight_decay, cfg.grad_clip, every
    )


# --------------------------------------------------------------------------------------
# The study


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n, "values": values}


def data_order(corpus: data.Corpus, steps: int, seed: int, cfg: StudyConfig) -> Tensor:
    """Window offsets for ``steps`` steps; with ``fixed_batch`` the first batch every step."""
    starts = data.batch_starts(corpus.train.numel(), cfg.seq_len, cfg.batch_size, steps, seed)
    return starts[:1].expand(steps, -1) if cfg.fixed_batch else starts


def build_variants(
    names: tuple[str, ...], factory: Variants, base: nn.Module, example: Tensor
) -> dict[str, tuple[nn.Module, dict]]:
    """Build each variant from ``base``'s current weights; record build time and init gap."""
    built = {}
    for name in names:
        t0 = time.perf_counter()
        model, converted_now = factory.build(name, base, example)
        seconds = time.perf_counter() - t0
        info = {
            "build_seconds": seconds,
            "converted_now": converted_now,
            "init": probe.init_checks(model, base, example),
            "params": sum(p.numel() for p in model.parameters()),
            "type": type(model).__name__,
        }
        print(f"  {name}: built in {seconds:.1f}s, {info['params']} params, init {info['init']}", flush=True)
        built[name] = (model, info)
    return built


def run_seed(
    seed: int, corpus: data.Corpus, val: tuple[Tensor, Tensor], probe_xy: tuple[Tensor, Tensor], factory: Variants
) -> tuple[dict, dict[str, nn.Module]]:
    """Train baseline, Block and Full from the same initial weights and data order."""
    cfg = factory.cfg
    print(f"seed {seed}", flush=True)
    torch.manual_seed(seed)
    base = build_baseline(cfg, seed)
    starts = data_order(corpus, cfg.steps, seed, cfg)
    example = data.windows(corpus.train, starts[0], cfg.seq_len)[0].to(cfg.device)
    built = build_variants(VARIANTS, factory, base, example)
    runs = [Run(model, main_schedule(cfg), name) for name, (model, _) in built.items()]
    train_lockstep(runs, corpus.train, starts, val, cfg)
    out: dict = {"seed": seed, "variants": {}}
    for run in runs:
        result = run.result()
        result.update(built[run.label][1])
        result["probe"] = probe.probe_model(run.model, *probe_xy, cfg.layers)
        out["variants"][run.label] = result
    return out, {run.label: run.model for run in runs}


def run_retrofit(base: nn.Module, corpus: data.Corpus, val: tuple[Tensor, Tensor], factory: Variants) -> dict:
    """Fine-tune a trained baseline and its ``exact`` conversion on the same new windows."""
    cfg = factory.cfg
    print("retrofit", flush=True)
    sched = retrofit_schedule(cfg)
    starts = data_order(corpus, sched.steps, cfg.retrofit_seed, cfg)
    example = data.windows(corpus.train, starts[0], cfg.seq_len)[0].to(cfg.device)
    built = build_variants(("baseline", "exact"), factory, base, example)
    runs = [Run(model, sched, name) for name, (model, _) in built.items()]
    train_lockstep(runs, corpus.train, starts, val, cfg)
    out: dict = {"schedule": dataclasses.asdict(sched), "data_seed": cfg.retrofit_seed, "variants": {}}
    for run in runs:
        out["variants"][run.label] = {**run.result(), **built[run.label][1]}
    return out


def summarise(seeds: list[dict]) -> dict:
    """Final validation loss and throughput per variant, with the spread over seeds."""
    summary = {}
    for name in VARIANTS:
        runs = [s["variants"][name] for s in seeds]
        summary[name] = {
            "final_val_loss": mean_std([r["final_val_loss"] for r in runs]),
            "tokens_per_s": mean_std([r["tokens_per_s"] for r in runs]),
            "tokens_per_cpu_s": mean_std([r["tokens_per_cpu_s"] for r in runs]),
        }
    for name in ("block", "full"):
        deltas = [s["variants"][name]["final_val_loss"] - s["variants"]["baseline"]["final_val_loss"] for s in seeds]
        summary[name]["delta_vs_baseline"] = mean_std(deltas)
    deltas = [s["variants"]["full"]["final_val_loss"] - s["variants"]["block"]["final_val_loss"] for s in seeds]
    summary["full"]["delta_vs_block"] = mean_std(deltas)
    return summary


def environment(cfg: StudyConfig) -> dict:
    """Where the numbers come from (throughput depends on all of it)."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": cfg.device,
    }


def run_study(cfg: StudyConfig, out_dir: Path, plots: bool = True) -> dict:
    """The whole study with ``cfg.threads`` intra-op threads (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_study(cfg, out_dir, plots)
    finally:
        torch.set_num_threads(previous)


def _run_study(cfg: StudyConfig, out_dir: Path, plots: bool) -> dict:
    """Seeds x variants, then the retrofit; JSON and plots in ``out_dir``."""
    t_start = time.perf_counter()
    corpus = data.load_corpus(cfg.val_files, cfg.max_train_files)
    val_starts = data.eval_starts(corpus.val.numel(), cfg.seq_len, cfg.eval_windows)
    val = tuple(t.to(cfg.device) for t in data.windows(corpus.val, val_starts, cfg.seq_len))
    probe_xy = (val[0][: cfg.probe_windows], val[1][: cfg.probe_windows])
    print(
        f"corpus: {len(corpus.train_files)} train files ({corpus.train.numel()} bytes), "
        f"{len(corpus.val_files)} val files ({corpus.val.numel()} bytes)",
        flush=True,
    )
    seeds, first_models = [], None
    factory = Variants(cfg)
    for seed in cfg.seeds:
        result, models = run_seed(seed, corpus, val, probe_xy, factory)
        seeds.append(result)
        first_models = first_models or models
    retrofit = run_retrofit(first_models["baseline"], corpus, val, factory)
    results = {
        "config": dataclasses.asdict(cfg),
        "environment": environment(cfg),
        "corpus": corpus.summary(),
        "summary": summarise(seeds),
        "seeds": seeds,
        "retrofit": retrofit,
        "train_mode_check": probe.train_mode_check(first_models["block"], probe_xy[0]),
        "dropout_mode_check": None if cfg.quick else probe.dropout_mode_check(),
        "wall_seconds": time.perf_counter() - t_start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULTS_NAME, results)
    if plots:
        from samples import study_plots

        results["plots"] = study_plots.plot_all(results, out_dir)
        write_json(out_dir / RESULTS_NAME, results)
    return results


def write_json(path: Path, payload: dict) -> None:
    """Atomic write: a temporary file in the same directory, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=True)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> tuple[StudyConfig, Path, bool]:
    """Flags mirror :class:`StudyConfig`; ``--quick`` applies the smoke-test sizes first."""
    defaults = StudyConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds); writes to a temp dir by default")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default {RESULTS_DIR})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    for field in dataclasses.fields(StudyConfig):
        if field.name in ("seeds", "quick"):
            continue
        value = getattr(defaults, field.name)
        if isinstance(value, bool):
            p.add_argument(f"--{field.name.replace('_', '-')}", action="store_true", default=None)
            continue
        kind = type(value) if value is not None else int
        p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None, help=f"default {value}")
    args = p.parse_args(argv)
    cfg = quick_config(defaults) if args.quick else defaults
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig) if f.name != "quick"}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    out = args.out or (Path(tempfile.gettempdir()) / "attnres_train_lm_quick" if args.quick else RESULTS_DIR)
    return cfg, out, not args.no_plots


def main(argv: list[str] | None = None) -> dict:
    cfg, out, plots = parse_args(argv)
    results = run_study(cfg, out, plots)
    for name, s in results["summary"].items():
        v, t = s["final_val_loss"], s["tokens_per_s"]
        print(f"{name:9s} val loss {v['mean']:.4f} +- {v['std']:.4f}  ({t['mean']:.0f} tokens/s)")
    print(f"results: {out / RESULTS_NAME}")
    return results


if __name__ == "__main__":
    main()
