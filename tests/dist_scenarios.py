"""Scenarios two gloo processes run for tests/test_distributed.py (one launch, every scenario; results as JSON).

Every scenario trains a copy of one converted sample Llama (2 layers, 2 blocks, exact
mode, dropout 0; 4 layers for the pipeline) on the same global batches as a one-process
reference: rank ``r`` takes rows ``2r, 2r+1`` of each 4-row batch, so the mean of the
ranks' losses is the reference's loss. Deep copies share the converted model's
programs: only calls of a new kind (bf16 under a mixed-precision policy, a model
materialised after sharding) capture again. The conversions and references are made
once, in a launcher process the two workers are forked from (:func:`launch`).

Each scenario returns plain data (losses, flags, notes) that the tests compare; an
exception is recorded with its traceback instead, so one failing scenario does not hide
the others. Collectives time out after ``TIMEOUT`` seconds, so a scenario that fails
on one rank only cannot hang the other for long.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attnres_rewrite as ar
from attnres_rewrite import distributed as ard
from attnres_rewrite import samples
from attnres_rewrite.api import programs

WORLD = 2
STEPS = 4
SAVE_AT = 2  # the distributed checkpoint is written after this many steps
ROWS, SEQ, VOCAB = 4, 12, 97
LR = 1e-2
TIMEOUT = 90


def batches() -> list[torch.Tensor]:
    """A learnable task: each row a random 4-token pattern, repeated (the same on every rank)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (ROWS, 4), generator=gen).repeat(1, SEQ // 4) for _ in range(STEPS)]


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def build(device: str | None = None, layers: int = 2):
    with torch.device(device or "cpu"):
        model, inputs = samples.get("llama", layers=layers, dropout=0.0)
    return model.train(), inputs


def reference_run(converted, data) -> tuple[list[float], dict]:
    """One process, the whole batch: the losses and final weights every scenario is compared with."""
    reference = copy.deepcopy(converted)
    opt = torch.optim.Adam(reference.parameters(), lr=LR)
    losses = []
    for ids in data:
        loss = loss_of(reference, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in reference.state_dict().items()}


class Shared:
    """Built once in the launcher, before the two workers fork from it: conversions (programs captured) and references.

    Forking after the captures gives both workers the same programs for the price of one
    capture; what each worker still captures is what needs its process group (calls on
    sharded models: bf16 layers, a model materialised after sharding).
    """

    def __init__(self) -> None:
        self.data = batches()
        self.original, inputs = build()
        self.converted = ar.convert(self.original, inputs, num_blocks=2, mode="exact")  # captures in train mode
        self.losses, self.final = reference_run(self.converted, self.data)
        original4, inputs4 = build(layers=4)  # pipeline stages: 4 layers, 2 blocks
        self.converted4 = ar.convert(original4, inputs4, num_blocks=2, mode="exact")
        self.losses4, _ = reference_run(self.converted4, self.data)
        on_meta, inputs = build("meta")
        self.on_meta = ar.convert_(on_meta, tuple(t.to("meta") for t in inputs), num_blocks=2, mode="exact")


SHARED: Shared | None = None


class Context:
    """What a worker's scenarios share: its rank, the launcher's conversions and references."""

    def __init__(self, rank: int, directory: Path, shared: Shared) -> None:
        self.rank, self.directory = rank, directory
        self.shared = shared
        self.original, self.converted = shared.original, shared.converted
        self.data, self.losses, self.final = shared.data, shared.losses, shared.final

    def rows(self, ids: torch.Tensor, rank: int | None = None, world: int = WORLD) -> torch.Tensor:
        rank = self.rank if rank is None else rank
        per = ROWS // world
        return ids[rank * per : (rank + 1) * per]

    def train(self, model, opt, steps, group=None, world: int = WORLD) -> list[float]:
        """Train on this rank's rows of ``steps``; the losses averaged over the ranks (the global batch's loss)."""
        out = []
        for step in steps:
            loss = loss_of(model, self.rows(self.data[step], world=world))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total = loss.detach().clone()
            if world > 1:
                dist.all_reduce(total, group=group)
            out.append(total.item() / world)
        return out


def _gathered_now(module) -> bool:
    """Are the module's own parameters plain tensors (gathered) rather than FSDP's sharded DTensors?"""
    params = list(module.parameters())
    return bool(params) and not any(_is_dtensor(p) for p in params)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# --------------------------------------------------------------------------------------
# scenarios


def ddp(ctx: Context) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(copy.deepcopy(ctx.converted))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    return {"losses": ctx.train(model, opt, range(STEPS)), "reference": ctx.losses}


def fsdp(ctx: Context) -> dict:
    """fully_shard per layer and root; the layers' gathers happen when each layer runs; DCP save at SAVE_AT."""
    model = ard.shard(copy.deepcopy(ctx.converted))
    layers = [m for _, m in ard.layer_modules(model)]
    events: list[list] = []
    root_hook = model.register_forward_pre_hook(
        lambda m, a: events.append(["root", [_gathered_now(x) for x in layers]])
    )
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, i=i: events.append([f"layer{i}", [_gathered_now(x) for x in layers], type(a[0]).__name__])
        )
        for i, layer in enumerate(layers)
    ]
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    losses = ctx.train(model, opt, range(SAVE_AT))
    root_hook.remove()
    for h in hooks:
        h.remove()
    ard.save_sharded(ctx.directory / "dcp", model, opt)
    losses += ctx.train(model, opt, range(SAVE_AT, STEPS))
    ar.save_converted(model, ctx.directory / "whole")  # every rank calls it; rank 0 writes
    whole = {}
    if ctx.rank == 0:
        loaded = ar.load_converted(ctx.directory / "whole", build()[0])
        whole = _max_rel_diff(loaded.state_dict(), ctx.final)
    return {
        "losses": losses,
        "reference": ctx.losses,
        "events": events[: 1 + len(layers)],  # the first forward
        "sharded": {name: _is_dtensor(p) for name, p in model.named_parameters()},
        "programs": len(programs(model)[""]),
        "whole_max_rel_diff": whole,
        "files": sorted(p.name for p in (ctx.directory / "whole").iterdir()) if ctx.rank == 0 else [],
    }


def _max_rel_diff(got: dict, want: dict) -> dict:
    out = {}
    for name, value in want.items():
        other = got[name].float()
        out[name] = ((other - value.float()).abs().max() / value.float().abs().max().clamp_min(1e-12)).item()
    return out


def dcp_resume(ctx: Context) -> dict:
    """A fresh sharded model and optimizer load the checkpoint written at SAVE_AT and continue."""
    model = ard.shard(copy.deepcopy(ctx.converted))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    other = Path(tempfile.mkdtemp())  # a checkpoint of another conversion is refused before anything is read
    record = json.loads((ctx.directory / "dcp" / "attnres_model.json").read_text())
    record["plan"]["mode"] = "paper"
    (other / "attnres_model.json").write_text(json.dumps(record))
    try:
        ard.load_sharded(other, model, opt)
        refused = ""
    except ar.errors.AdapterError as exc:
        refused = str(exc)
    ard.load_sharded(ctx.directory / "dcp", model, opt)
    losses = ctx.train(model, opt, range(SAVE_AT, STEPS))
    return {"losses": losses, "reference": ctx.losses[SAVE_AT:], "refused_other_plan": refused}


def dcp_other_world_size(ctx: Context) -> dict:
    """Resume the two-rank checkpoint on one rank (a one-rank mesh of rank 0) with the whole batch."""
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group([0])  # every rank takes part in creating it
    if ctx.rank != 0:
        return {"skipped": "rank 0 resumes alone"}
    mesh = DeviceMesh.from_group(group, "cpu")
    model = ard.shard(copy.deepcopy(ctx.converted), mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ard.load_sharded(ctx.directory / "dcp", model, opt, process_group=group)
    losses = ctx.train(model, opt, range(SAVE_AT, STEPS), group=group, world=1)
    return {"losses": losses, "reference": ctx.losses[SAVE_AT:], "mesh_size": mesh.size()}


def checkpointed(ctx: Context) -> dict:
    """Activation checkpointing per layer: one process, gradients equal; then under FSDP, losses equal."""
    before = len(programs(ctx.converted)[""])
    plain = copy.deepcopy(ctx.converted)
    wrapped = ard.checkpoint_layers(copy.deepcopy(ctx.converted))
    calls = []
    for _, layer in ard.layer_modules(wrapped):
        inner = layer._checkpoint_wrapped_module
        inner.register_forward_pre_hook(lambda m, a: calls.append(type(a[0]).__name__))
    grads = {}
    for label, model in (("plain", plain), ("checkpointed", wrapped)):
        loss_of(model, ctx.data[0]).backward()
        grads[label] = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    diffs = {
        n: ((grads["checkpointed"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        for n, g in grads["plain"].items()
    }
    sharded = ard.shard(ard.checkpoint_layers(copy.deepcopy(ctx.converted)))
    opt = torch.optim.Adam(sharded.parameters(), lr=LR)
    losses = ctx.train(sharded, opt, range(2))
    return {
        "grad_rel_diffs": diffs,
        "names_equal": sorted(grads["plain"]) == sorted(grads["checkpointed"]),
        "layer_calls": calls,
        "state_dict_names_equal": sorted(wrapped.state_dict()) == sorted(plain.state_dict()),
        "fsdp_losses": losses,
        "reference": ctx.losses[:2],
        "new_programs": len(programs(ctx.converted)[""]) - before,
    }


def meta_path(ctx: Context) -> dict:
    """Convert on meta, fully_shard, to_empty, attach each rank's shard of the real weights, train."""
    converted = ctx.shared.on_meta  # converted on meta (in the launcher)
    ard.shard(converted)
    partial = {k: v for k, v in ctx.original.state_dict().items() if k != "norm.weight"}
    try:
        ar.attach_weights(converted, partial)  # a tensor left without a value is refused, nothing changes
        refused = ""
    except ar.errors.InvalidInputError as exc:
        refused = str(exc)
    still_on_meta = all(p.to_local().is_meta for p in converted.parameters())
    ar.attach_weights(converted, ctx.original)  # to_empty on FSDP's device, then each rank copies its shards
    opt = torch.optim.Adam(converted.parameters(), lr=LR)
    losses = ctx.train(converted, opt, range(STEPS))
    captured = programs(converted)[""]
    return {
        "losses": losses,
        "reference": ctx.losses,
        "programs": len(captured),
        "signature": captured[-1].signature if captured else "",
        "sharded": all(_is_dtensor(p) for p in converted.parameters()),
        "refused_missing_weight": refused,
        "still_on_meta_after_refusal": still_on_meta,
    }


def mixed_precision(ctx: Context) -> dict:
    """bf16 parameters in the layers (MixedPrecisionPolicy), checkpointed layers: the capture runs on sharded stand-ins."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = ard.shard(ard.checkpoint_layers(copy.deepcopy(ctx.converted)), mp_policy=policy)
    before = len(programs(model)[""])
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    seen = []
    inner = ard.layer_modules(model)[0][1]._checkpoint_wrapped_module
    inner.register_forward_pre_hook(lambda m, a: seen.append(str(m.attn_norm.weight.dtype)))
    losses = ctx.train(model, opt, range(STEPS))
    after = programs(model)[""]
    layer_source = after[-1].layers[0].source
    return {
        "losses": losses,
        "reference": ctx.losses,
        "new_programs": len(after) - before,
        "layer_param_dtype_when_called": sorted(set(seen)),
        "layer_graph_bf16": "torch.bfloat16" in layer_source,
        "layer_graph_on_meta": "device(type='meta')" in layer_source,
        "grad_dtype": str(next(model.parameters()).grad.dtype),
        "param_dtype": str(next(model.parameters()).dtype),
    }


def _pipeline_run(ctx: Context, converted, split_kwargs: dict, schedule: str, steps: range) -> dict:
    from torch.distributed.pipelining import ScheduleGPipe, ScheduleInterleaved1F1B

    from attnres_rewrite.distributed.pipeline import split_pipeline

    model = copy.deepcopy(converted)
    split = split_pipeline(model, (ctx.data[0][:2],), **split_kwargs)
    mine = [i for i, r in enumerate(split.ranks) if r == ctx.rank]
    stages = [split.pipeline_stage(i, "cpu") for i in mine]

    def loss_fn(output, target):
        return F.cross_entropy(output[:, :-1].reshape(-1, VOCAB).float(), target[:, 1:].reshape(-1))

    if schedule == "gpipe":
        run = ScheduleGPipe(stages[0], n_microbatches=2, loss_fn=loss_fn)
    else:
        run = ScheduleInterleaved1F1B(stages, n_microbatches=2, loss_fn=loss_fn)
    params = list({id(p): p for i in mine for p in split.module(i).parameters()}.values())
    opt = torch.optim.Adam(params, lr=LR)
    first, last = 0 in mine, split.num_stages - 1 in mine
    losses = []
    for step in steps:
        ids = ctx.data[step]
        micro = [] if last else None
        opt.zero_grad()
        run.step(*((ids,) if first else ()), target=ids if last else None, losses=micro)
        split.sync_grads()
        opt.step()
        box = [sum(x.item() for x in micro) / len(micro) if last else None]
        dist.broadcast_object_list(box, src=split.ranks[-1])
        losses.append(box[0])
    return {
        "losses": losses,
        "stages": [dataclasses.asdict(st) for st in split.stages],
        "sent_bytes_per_microbatch": {i: split.module(i).last_sent_bytes for i in mine},
    }


def pipeline(ctx: Context) -> dict:
    """torch.distributed.pipelining: 2 stages at the block end (GPipe), and 4 virtual stages (interleaved 1F1B)."""
    converted = ctx.shared.converted4
    out = {"reference": ctx.shared.losses4}
    out["gpipe"] = _pipeline_run(ctx, converted, {"stages": 2}, "gpipe", range(STEPS))
    virtual = {"boundaries": [1, 2, 3], "world_size": WORLD}
    out["cached"] = _pipeline_run(ctx, converted, {**virtual, "scheme": "cached"}, "interleaved", range(2))
    out["resend"] = _pipeline_run(ctx, converted, {**virtual, "scheme": "resend"}, "interleaved", range(1))
    return out


def example(ctx: Context) -> dict:
    """samples/train_distributed.py's run() in this process group (FSDP2, checkpointed layers)."""
    from samples import train_distributed

    lines: list[str] = []
    flags = ["--fsdp", "--checkpoint-activations", "--steps", "6", "--batch", "4", "--seq", "16", "--log-every", "2"]
    before = len(programs(ctx.converted)[""])
    result = train_distributed.run(flags, converted=ctx.converted, log=lines.append)
    return {"losses": result["losses"], "lines": lines, "captures": len(programs(ctx.converted)[""]) - before}


SCENARIOS = {
    "ddp": ddp,
    "fsdp": fsdp,
    "dcp_resume": dcp_resume,
    "dcp_other_world_size": dcp_other_world_size,
    "checkpointed": checkpointed,
    "meta_path": meta_path,
    "mixed_precision": mixed_precision,
    "pipeline": pipeline,
    "example": example,
}


def main(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    """One worker (forked from :func:`launch`): run ``names`` and write ``rank<r>.json``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT))
    results: dict = {}
    try:
        ctx = Context(rank, Path(out) / "shared", SHARED)
        for name in names:
            started = time.process_time()
            try:
                results[name] = {"ok": True, **SCENARIOS[name](ctx)}
            except Exception:  # noqa: BLE001 - recorded for the test to report
                results[name] = {"ok": False, "error": traceback.format_exc()}
            results[name]["cpu_s"] = time.process_time() - started
    except Exception:  # noqa: BLE001
        results["setup"] = {"ok": False, "error": traceback.format_exc()}
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def launch(out: str, port: int, names: list[str], deadline_s: float) -> None:
    """Prepare :class:`Shared` once, then fork the two workers from this (fresh, single-threaded) process.

    The test spawns this launcher (so nothing of the test process is forked); it kills
    the workers when they overrun ``deadline_s`` and exits non-zero when one failed.
    """
    import torch.multiprocessing as mp

    global SHARED
    torch.set_num_threads(1)
    started = time.process_time()
    SHARED = Shared()
    Path(out, "launcher.json").write_text(json.dumps({"prepare_cpu_s": time.process_time() - started}))
    workers = mp.start_processes(main, args=(WORLD, port, out, names), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + deadline_s
    while not workers.join(timeout=2):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            raise SystemExit(f"the workers did not finish within {deadline_s} s")


if __name__ == "__main__":  # manual run: python tests/dist_scenarios.py [names...]
    import sys

    directory = tempfile.mkdtemp()
    launch(directory, 29533, sys.argv[1:] or list(SCENARIOS), 900)
    for r in range(WORLD):
        print(r, Path(directory, f"rank{r}.json").read_text())
