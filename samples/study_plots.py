"""Plots of the training study (matplotlib, PNG), drawn from the results JSON alone.

Working from the JSON (not from live models) means the pictures can be redrawn from a
committed result file without re-training: ``python -m samples.study_plots``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"baseline": "tab:gray", "block": "tab:blue", "full": "tab:orange", "exact": "tab:green"}
LABELS = {
    "baseline": "baseline (standard residual)",
    "block": "Block AttnRes (paper mode)",
    "full": "Full AttnRes (paper mode)",
    "exact": "Block AttnRes (exact-mode retrofit)",
}
FILES = {
    "val_loss": "train_lm_val_loss.png",
    "depth_attention": "train_lm_depth_attention.png",
    "depth_stats": "train_lm_depth_stats.png",
    "retrofit": "train_lm_retrofit.png",
}


def save(fig, path: Path) -> str:
    """Atomic PNG write (temporary file, then rename); returns the file name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)
    return path.name


def sublayer_labels(layers: int) -> list[str]:
    return [f"{i}.{b}" for i in range(layers) for b in ("attn", "mlp")]


def seed_runs(results: dict, variant: str) -> list[dict]:
    return [s["variants"][variant] for s in results["seeds"]]


def plot_val_loss(results: dict, out_dir: Path) -> str:
    """Mean validation curve per variant with the min-max band over seeds, plus final losses per seed."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    tokens_per_step = results["config"]["batch_size"] * results["config"]["seq_len"]
    for name in ("baseline", "block", "full"):
        runs = seed_runs(results, name)
        steps = np.array(runs[0]["val"]["step"])
        curves = np.array([r["val"]["val_loss"] for r in runs])
        ax.plot(steps * tokens_per_step / 1e3, curves.mean(0), color=COLORS[name], label=LABELS[name])
        ax.fill_between(steps * tokens_per_step / 1e3, curves.min(0), curves.max(0), color=COLORS[name], alpha=0.2)
        finals = [r["final_val_loss"] for r in runs]
        x = {"baseline": 0, "block": 1, "full": 2}[name]
        ax2.scatter([x] * len(finals), finals, color=COLORS[name], zorder=3)
        ax2.errorbar(
            x + 0.15,
            np.mean(finals),
            yerr=np.std(finals, ddof=1) if len(finals) > 1 else 0,
            fmt="_",
            color="black",
            capsize=4,
        )
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title("Validation loss (mean over seeds, band = min..max)")
    lo = min(min(r["final_val_loss"] for r in seed_runs(results, n)) for n in ("baseline", "block", "full"))
    ax.set_ylim(lo - 0.1, lo + 1.5)
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.set_xticks([0, 1, 2], ["baseline", "Block", "Full"])
    ax2.set_title(f"Final validation loss, {len(results['seeds'])} seeds (mean ± std)")
    ax2.grid(alpha=0.3)
    return save(fig, out_dir / FILES["val_loss"])


def attention_matrix(rows: list[list[float]]) -> np.ndarray:
    """Left-aligned matrix of per-aggregation weights (NaN where a row has fewer sources).

    Source ``k`` of a row is column ``k`` for both layouts: in Block AttnRes the sources
    of a sublayer in block ``n`` are ``b_0..b_{n-1}`` then the partial sum of block ``n``
    (column ``n``); in Full AttnRes they are ``v_0..v_{l-1}``.
    """
    width = max(len(r) for r in rows)
    mat = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        mat[i, : len(r)] = r
    return mat


def mean_attention(results: dict, variant: str) -> np.ndarray:
    """Depth-attention weights averaged over tokens and over seeds."""
    mats = [attention_matrix(r["probe"]["depth_attention"]) for r in seed_runs(results, variant)]
    return np.stack(mats).mean(axis=0)  # every seed has the same layout: NaNs coincide


def plot_depth_attention(results: dict, out_dir: Path) -> str:
    """Heatmaps of the learned alpha per sublayer (rows) over sources (columns)."""
    layers = results["config"]["layers"]
    row_labels = [*sublayer_labels(layers), "output"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.35 * len(row_labels) + 2.5), layout="constrained")
    for ax, name in zip(axes, ("block", "full")):
        mat = mean_attention(results, name)
        im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        if name == "block":
            cols = ["emb", *[f"block {j}" for j in range(1, mat.shape[1])]]
            title = (
                f"Block AttnRes ({results['config']['num_blocks']} blocks): sources = completed blocks, then partial"
            )
        else:
            cols = ["emb", *sublayer_labels(layers)][: mat.shape[1]]
            title = "Full AttnRes: sources = embedding and every earlier sublayer output"
        ax.set_xticks(range(mat.shape[1]), cols, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
        ax.set_xlabel("source")
        ax.set_ylabel("aggregation feeding sublayer")
        ax.set_title(title, fontsize=9)
        for (i, j), v in np.ndenumerate(mat):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle("Learned depth-attention weights (averaged over tokens of held-out windows and over seeds)")
    return save(fig, out_dir / FILES["depth_attention"])


def plot_depth_stats(results: dict, out_dir: Path) -> str:
    """Per-sublayer input magnitude, branch-output magnitude and gradient norm across depth."""
    layers = results["config"]["layers"]
    panels = [
        ("sublayer_input_rms", "RMS of the sublayer input h_l\n(stream value / AttnRes aggregate)"),
        ("branch_output_rms", "RMS of the sublayer output v_l"),
        ("grad_norm", "gradient norm of the sublayer's parameters"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(2 * layers)
    for ax, (key, title) in zip(axes, panels):
        for name in ("baseline", "block", "full"):
            vals = [r["probe"][key] for r in seed_runs(results, name)]
            if any(v is None for run in vals for v in run):
                continue
            arr = np.array(vals, dtype=float)
            ax.errorbar(
                x,
                arr.mean(0),
                yerr=[arr.mean(0) - arr.min(0), arr.max(0) - arr.mean(0)],
                marker="o",
                ms=3,
                capsize=2,
                color=COLORS[name],
                label=LABELS[name],
            )
        ax.set_xticks(x, sublayer_labels(layers), rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Across depth, after training (mean over seeds, bars = min..max)")
    return save(fig, out_dir / FILES["depth_stats"])


def smooth(values: list[float], beta: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (for noisy per-step training losses)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return np.array(out)


def plot_retrofit(results: dict, out_dir: Path) -> str:
    """Fine-tuning curves of the trained baseline and of its exact-mode conversion."""
    retro = results["retrofit"]["variants"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, run in retro.items():
        ax.plot(run["val"]["step"], run["val"]["val_loss"], marker="o", ms=3, color=COLORS[name], label=LABELS[name])
        ax2.plot(
            np.arange(1, len(run["train_loss"]) + 1), smooth(run["train_loss"]), color=COLORS[name], label=LABELS[name]
        )
    ax.set_title("Retrofit: validation loss while fine-tuning")
    ax2.set_title("Retrofit: training loss (EMA 0.9)")
    for a in (ax, ax2):
        a.set_xlabel("fine-tuning step")
        a.set_ylabel("loss (nats / byte)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return save(fig, out_dir / FILES["retrofit"])


def plot_all(results: dict, out_dir: Path) -> dict:
    """Every figure of the study; returns ``{figure: file name}`` for the results JSON."""
    return {
        "val_loss": plot_val_loss(results, out_dir),
        "depth_attention": plot_depth_attention(results, out_dir),
        "depth_stats": plot_depth_stats(results, out_dir),
        "retrofit": plot_retrofit(results, out_dir),
    }


def _pm(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_tables(results: dict) -> str:
    """The numbers of docs/results.md, rendered from the JSON (so the doc cannot drift)."""
    summ = results["summary"]
    seeds = [s["seed"] for s in results["seeds"]]
    lines = [
        f"| variant | final val loss (mean ± std, n={len(seeds)}) | per seed {seeds} | Δ vs baseline | tokens/s (wall) | tokens/CPU-s |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("baseline", "block", "full"):
        s = summ[name]
        per_seed = ", ".join(f"{v:.4f}" for v in s["final_val_loss"]["values"])
        delta = _pm(s["delta_vs_baseline"]) if "delta_vs_baseline" in s else "-"
        lines.append(
            f"| {LABELS[name]} | {_pm(s['final_val_loss'])} | {per_seed} | {delta} | "
            f"{s['tokens_per_s']['mean']:.0f} ± {s['tokens_per_s']['std']:.0f} | {s['tokens_per_cpu_s']['mean']:.0f} |"
        )
    lines.append("")
    lines.append(f"Full − Block (paired by seed): {_pm(summ['full']['delta_vs_block'])}")
    lines.append("")
    retro = results["retrofit"]["variants"]
    lines.append(
        "| retrofit | val loss at conversion | val loss after fine-tuning | max abs logit diff at conversion |"
    )
    lines.append("|---|---|---|---|")
    for name, run in retro.items():
        lines.append(
            f"| {LABELS[name]} | {run['val']['val_loss'][0]:.4f} | {run['final_val_loss']:.4f} | "
            f"{run['init']['max_abs_logit_diff']:.2e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "train_lm.json"
    results = json.loads(path.read_text())
    print(plot_all(results, path.parent))
    print(markdown_tables(results))
