"""Train a converted model with PyTorch's distributed engine: DDP or FSDP2 per layer, on CPUs (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 2 samples/train_distributed.py --fsdp
    torchrun --nproc-per-node 2 samples/train_distributed.py --fsdp --bf16 --checkpoint-activations --meta
    torchrun --nproc-per-node 2 samples/train_distributed.py --fsdp --steps 10 --save out/run
    torchrun --nproc-per-node 1 samples/train_distributed.py --fsdp --steps 20 --resume out/run/checkpoint

What it does on every rank:

1. builds the ``samples`` Llama-style decoder (its weights stand for a pretrained
   checkpoint) and converts it with :func:`attnres_rewrite.convert` in ``exact`` mode
   (equal to the original at conversion), or, with ``--meta``, converts a copy built on
   the ``meta`` device (no memory; how a 7B-70B model is converted) and gives it the
   weights after sharding (:func:`attnres_rewrite.attach_weights` materialises the
   shards on the compute device and each rank copies its part of the weights);
2. ``--checkpoint-activations``: wraps each layer in ``checkpoint_wrapper``;
   ``--fsdp``: ``fully_shard`` on each layer, then on the model (the AttnRes queries and
   key gains go with the root), ``--bf16`` with ``MixedPrecisionPolicy(param_dtype=
   bfloat16, reduce_dtype=float32)``; ``--ddp``: ``DistributedDataParallel``;
3. trains with AdamW on a synthetic task (rows drawn from 32 fixed 8-token patterns,
   repeated; the same global batch on any world size, split by rank), printing progress
   on rank 0;
4. ``--save DIR``: a distributed checkpoint of model and optimizer (``DIR/checkpoint``,
   loadable on any world size with ``--resume``) and the whole converted model as one
   directory (``DIR/model``, read back with :func:`attnres_rewrite.load_converted`).

On GPUs (``torch.cuda.is_available()``) each rank uses ``cuda:LOCAL_RANK`` and NCCL;
otherwise the CPU and gloo. docs/distributed.md explains the recipe.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite import distributed as ard
from attnres_rewrite.samples import llama


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fsdp", action="store_true", help="fully_shard per layer, then the model (default)")
    mode.add_argument("--ddp", action="store_true", help="DistributedDataParallel")
    p.add_argument("--bf16", action="store_true", help="FSDP mixed precision: bf16 parameters, fp32 reductions")
    p.add_argument("--checkpoint-activations", action="store_true", help="checkpoint_wrapper on every layer")
    p.add_argument("--meta", action="store_true", help="convert on the meta device, shard, then attach the weights")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2, help="AttnRes blocks")
    p.add_argument("--batch", type=int, default=8, help="global batch (rows), split over the ranks")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--save", type=Path, help="write DIR/checkpoint (DCP) and DIR/model (whole model) at the end")
    p.add_argument("--resume", type=Path, help="a DIR/checkpoint written by --save (any world size)")
    args = p.parse_args(argv)
    if not args.ddp:
        args.fsdp = True
    if args.ddp and (args.bf16 or args.meta):
        p.error("--bf16 and --meta go with --fsdp")
    return args


VOCAB = 97


def batch(step: int, args: argparse.Namespace) -> torch.Tensor:
    """The global batch of ``step``: rows drawn from 32 fixed sequences (8-token patterns, repeated), learnable fast."""
    patterns = torch.randint(1, VOCAB, (32, 8), generator=torch.Generator().manual_seed(0))
    rows = torch.randint(0, 32, (args.batch,), generator=torch.Generator().manual_seed(1000 + step))
    return patterns[rows].repeat(1, args.seq // 8 + 1)[:, : args.seq]


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """The converted model (on ``device``, or still on meta with ``--meta``) and, for --meta, the original."""
    config = {"layers": args.layers, "dim": args.dim, "hidden": 3 * args.dim, "dropout": 0.0, "seq": 8}
    original, example = llama.build(**config)
    original.train()
    if not args.meta:
        return ar.convert(original.to(device), tuple(t.to(device) for t in example), num_blocks=args.blocks,
                          mode="exact"), None  # fmt: skip
    with torch.device("meta"):
        skeleton, _ = llama.build(**config)
    skeleton.train()
    example = tuple(t.to("meta") for t in example)
    return ar.convert_(skeleton, example, num_blocks=args.blocks, mode="exact"), original


def prepare(args: argparse.Namespace, converted: nn.Module, original: nn.Module | None, device: torch.device):
    if args.checkpoint_activations:
        ard.checkpoint_layers(converted)
    if args.ddp:
        return nn.parallel.DistributedDataParallel(
            converted, device_ids=[device.index] if device.type == "cuda" else None
        )
    policy = None
    if args.bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ard.shard(converted, mp_policy=policy)
    if original is not None:  # --meta: memory for the shards (to_empty), then each rank copies its part of the weights
        ar.attach_weights(converted, original, device=device)
    return converted


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW; the AttnRes queries and key gains (like norm gains) get no weight decay."""
    attnres = [p for n, p in model.named_parameters() if ".attnres." in f".{n}"]
    ids = {id(p) for p in attnres}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": rest}, {"params": attnres, "weight_decay": 0.0}], lr=lr, weight_decay=0.01)


def run(argv: list[str] | None = None, *, converted: nn.Module | None = None, log=print) -> dict[str, Any]:
    """Train as the flags say; returns the losses. Initialises the process group unless it already is.

    ``converted``: start from this converted model (a copy is trained) instead of building one.
    """
    args = parse(argv)
    owns_group = not dist.is_initialized()
    cuda = torch.cuda.is_available()
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")
    say = log if rank == 0 else (lambda *a, **k: None)
    started = time.perf_counter()
    original = None
    if converted is None:
        converted, original = build(args, device)
    else:
        converted = copy.deepcopy(converted)
    model = prepare(args, converted, original, device)
    opt = optimizer(model, args.lr)
    first = 0
    if args.resume is not None:
        state = ard.load_sharded(args.resume, converted, opt, extra={"step": torch.zeros((), dtype=torch.long)})
        first = int(state["step"])
        say(f"resumed {args.resume} at step {first} on {world} rank(s)")
    say(
        f"{'FSDP2' if args.fsdp else 'DDP'} on {world} rank(s) ({device.type}), {args.layers} layers, "
        f"bf16={args.bf16}, checkpointed layers={args.checkpoint_activations}, converted on meta={args.meta}; "
        f"ready in {time.perf_counter() - started:.1f} s"
    )
    per = args.batch // world
    losses = []
    tick = time.perf_counter()
    for step in range(first, args.steps):
        ids = batch(step, args)[rank * per : (rank + 1) * per].to(device)
        loss = loss_of(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if (step + 1) % args.log_every == 0 or step == first or step + 1 == args.steps:
            rate = (time.perf_counter() - tick) / (step + 1 - first)
            say(f"step {step + 1}/{args.steps}  loss {losses[-1]:.4f}  ({rate:.2f} s/step)")
    if losses:
        say(f"final loss {losses[-1]:.4f} (first {losses[0]:.4f})")
    if args.save is not None:
        ard.save_sharded(args.save / "checkpoint", converted, opt, extra={"step": torch.tensor(args.steps)})
        ar.save_converted(converted, args.save / "model", overwrite=True)
        say(f"saved {args.save / 'checkpoint'} (distributed checkpoint) and {args.save / 'model'} (whole model)")
    if owns_group:
        dist.destroy_process_group()
    return {"losses": losses, "world": world, "first_step": first}


if __name__ == "__main__":
    run()
