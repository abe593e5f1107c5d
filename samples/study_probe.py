"""Looking inside the trained models of the study: what the depth attention learned and
how magnitudes and gradients are spread over depth.

The baseline is an ordinary ``nn.Module`` and is probed with module hooks. A converted
model runs rewritten graphs in which the branch modules are inlined, so hooks on them
never fire; it is probed by re-running its rewritten graph
(``attnres_rewrite.api.rewritten_graphs``) with an FX ``Interpreter`` that records every
``attnres.block_attnres`` call (the sources, query and key gain it was given, and its
output, which is the sublayer's input) and the last node each branch module produced
(found through the ``nn_module_stack`` metadata that export attaches to every node).

Sublayers are named as in the ``samples`` Llama decoder: ``layers.{i}.attn`` and
``layers.{i}.mlp``, each preceded by its norm ``layers.{i}.attn_norm`` / ``mlp_norm``.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import Tensor, nn

import attnres_rewrite
from attnres_rewrite.reference import DEFAULT_EPS, attnres_weights
from samples.study_data import lm_loss, logits_of

BRANCHES = ("attn", "mlp")


def sublayer_names(layers: int) -> list[str]:
    """Branch module paths in stream order."""
    return [f"layers.{i}.{b}" for i in range(layers) for b in BRANCHES]


def rms(x: Tensor) -> float:
    """Root mean square over all entries (the per-token feature RMS, averaged)."""
    return x.detach().float().pow(2).mean().sqrt().item()


def graph_module(model: nn.Module, x: Tensor) -> torch.fx.GraphModule | None:
    """The rewritten graph a converted model runs on ``x``, or None for a model that is not converted."""
    if not attnres_rewrite.is_converted(model):
        return None
    (graph,) = attnres_rewrite.api.rewritten_graphs(model, (x,)).values()
    return graph


def is_attnres(target) -> bool:
    """Whether an FX call target is the single-pass aggregation op (any overload)."""
    packet = getattr(target, "overloadpacket", target)
    return packet is torch.ops.attnres.block_attnres


def module_path(node: torch.fx.Node) -> str | None:
    """Innermost module path of a node in export's ``nn_module_stack`` metadata."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").replace("L__self___", "")


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and records AttnRes calls and the last output of each branch."""

    def __init__(self, gm: torch.fx.GraphModule, branches: list[str]) -> None:
        super().__init__(gm)
        self.calls: list[dict] = []
        self.branch_out: dict[str, Tensor] = {}
        self.branches = branches

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if n.op == "call_function" and is_attnres(n.target):
            self.calls.append(self._call_record(n, out))
        path = module_path(n)
        if isinstance(out, Tensor) and path is not None:
            for name in self.branches:
                if path == name or path.startswith(name + "."):
                    self.branch_out[name] = out
        return out

    def _call_record(self, n: torch.fx.Node, out: Tensor) -> dict:
        sources, query, key_gain = (self.env[a] if isinstance(a, torch.fx.Node) else a for a in n.args[:3])
        sources = [self.env[s] if isinstance(s, torch.fx.Node) else s for s in sources]
        eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps", DEFAULT_EPS)
        weights = attnres_weights(sources, query, key_gain, eps)  # (K, *tokens)
        return {
            "node": n.name,
            "weights": weights.reshape(len(sources), -1).mean(dim=1).tolist(),
            "source_rms": [rms(s) for s in sources],
            "out_rms": rms(out),
        }


@torch.no_grad()
def trace_converted(model: nn.Module, x: Tensor, layers: int) -> dict:
    """Depth-attention weights and per-sublayer magnitudes of a converted model."""
    gm = graph_module(model, x)
    if gm is None:
        raise TypeError(f"expected a model returned by attnres_rewrite.convert, got {type(model).__name__}")
    rec = _Recorder(gm, sublayer_names(layers))
    rec.run(x)
    calls = rec.calls
    names = sublayer_names(layers)
    return {
        "depth_attention": [c["weights"] for c in calls],
        "attnres_nodes": [c["node"] for c in calls],
        "sublayer_input_rms": [c["out_rms"] for c in calls[: len(names)]],
        "stream_output_rms": calls[-1]["out_rms"] if len(calls) > len(names) else None,
        "branch_output_rms": [rms(rec.branch_out[n]) if n in rec.branch_out else None for n in names],
    }


@torch.no_grad()
def trace_baseline(model: nn.Module, x: Tensor, layers: int) -> dict:
    """Per-sublayer input (the stream entering the norm) and branch-output magnitudes."""
    modules = dict(model.named_modules())
    inputs, outputs, handles = {}, {}, []
    for name in sublayer_names(layers):
        handles.append(modules[name + "_norm"].register_forward_pre_hook(_store_input(inputs, name)))
        handles.append(modules[name].register_forward_hook(_store_output(outputs, name)))
    handles.append(modules["norm"].register_forward_pre_hook(_store_input(inputs, "final")))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    names = sublayer_names(layers)
    return {
        "sublayer_input_rms": [rms(inputs[n]) for n in names],
        "stream_output_rms": rms(inputs["final"]),
        "branch_output_rms": [rms(outputs[n]) for n in names],
    }


def _store_input(store: dict, name: str):
    def hook(_module, args):
        store[name] = args[0]

    return hook


def _store_output(store: dict, name: str):
    def hook(_module, _args, output):
        store[name] = output

    return hook


def grad_norms(model: nn.Module, x: Tensor, y: Tensor, layers: int) -> list[float]:
    """L2 norm of the LM-loss gradient of each sublayer's parameters (branch + its norm).

    Computed on a throw-away copy so the trained model's ``.grad`` stays untouched.
    """
    m = copy.deepcopy(model)
    m.train()
    lm_loss(m, x, y).backward()
    norms = []
    for name in sublayer_names(layers):
        sq = sum(
            p.grad.float().pow(2).sum().item()
            for n, p in m.named_parameters()
            if p.grad is not None and (n.startswith(name + ".") or n.startswith(name + "_norm."))
        )
        norms.append(sq**0.5)
    return norms


def probe_model(model: nn.Module, x: Tensor, y: Tensor, layers: int) -> dict:
    """All diagnostics of one trained model on the probe windows ``x`` (targets ``y``)."""
    model.eval()
    converted = attnres_rewrite.is_converted(model)
    stats = trace_converted(model, x, layers) if converted else trace_baseline(model, x, layers)
    stats["grad_norm"] = grad_norms(model, x, y, layers)
    model.train()
    return stats


@torch.no_grad()
def init_checks(model: nn.Module, base: nn.Module, x: Tensor) -> dict:
    """How far a freshly built variant is from the model it came from (max |logit diff|)."""
    model.eval(), base.eval()
    diff = (logits_of(model(x)).float() - logits_of(base(x)).float()).abs().max().item()
    model.train(), base.train()
    return {"max_abs_logit_diff": diff}


@torch.no_grad()
def train_mode_check(model: nn.Module, x: Tensor) -> dict:
    """Does ``train()``/``eval()`` change a converted model's output? (dropout is 0 here)."""
    model.train()
    a = logits_of(model(x))
    model.eval()
    b = logits_of(model(x))
    model.train()
    return {"train_vs_eval_max_abs_diff": (a - b).abs().max().item(), "type": type(model).__name__}


@torch.no_grad()
def dropout_mode_check(seed: int = 0) -> dict:
    """What ``train()`` / ``eval()`` mean for a converted model, measured with dropout 0.5.

    A converted model captures a program per call signature, the train/eval flags
    included, so ``train()`` and ``eval()`` behave as on the original whatever mode it
    was converted in. This converts a tiny dropout model in each mode and reports
    whether dropout is active afterwards in ``train()`` and in ``eval()`` (two calls on
    the same input differ only if it is), and how far ``eval()`` is from the original's
    ``eval()``.
    """
    import attnres_rewrite
    from attnres_rewrite import samples

    model, (x,) = samples.get("llama", layers=1, dropout=0.5, seed=seed)
    found = {}
    for captured_in in ("eval", "train"):
        m = copy.deepcopy(model)
        getattr(m, captured_in)()
        conv = attnres_rewrite.convert(m, (x,))
        conv.train()
        train_diff = (conv(x) - conv(x)).abs().max().item()
        conv.eval()
        eval_out = conv(x)
        eval_diff = (eval_out - conv(x)).abs().max().item()
        m.eval()
        found[f"captured_in_{captured_in}"] = {
            "dropout_active_after_train()": train_diff > 0,
            "dropout_active_after_eval()": eval_diff > 0,
            "eval_vs_original_eval_max_abs": (eval_out - m(x)).abs().max().item(),
        }
    return found
