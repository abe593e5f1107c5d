"""Smoke tests of the training study (samples/train_lm.py).

One quick study on a fixed batch checks that every variant trains (through the
converted graph too): finite losses that go down, and the JSON and plots written. No
result numbers are asserted: they belong to the study, not to the test suite.
"""

from __future__ import annotations

import json
import math

import torch

from samples import study_data, train_lm


def test_split_is_deterministic_and_disjoint():
    names = [f"pkg/mod{i}.py" for i in range(50)]
    train, val = study_data.split_files(names, 5)
    train2, val2 = study_data.split_files(list(reversed(names)), 5)
    assert (train, val) == (train2, val2)
    assert len(val) == 5 and not set(train) & set(val) and len(train) + len(val) == len(names)


def _check_run(label: str, run: dict) -> None:
    losses = run["train_loss"]
    assert losses and all(math.isfinite(v) for v in losses), (label, losses)
    assert losses[-1] < losses[0], (label, losses)  # same batch every step: the loss must fall
    assert all(math.isfinite(v) for v in run["val"]["val_loss"]), label


def test_quick_study_on_a_fixed_batch_trains_every_variant_and_writes_files(tmp_path):
    results = train_lm.main(["--quick", "--fixed-batch", "--out", str(tmp_path), "--lr", "1e-2"])
    written = json.loads((tmp_path / train_lm.RESULTS_NAME).read_text())
    assert written["config"]["fixed_batch"] is True
    assert set(written["summary"]) == {"baseline", "block", "full"}
    assert written["corpus"]["val_files"] and written["corpus"]["num_train_files"] > 0
    for name, run in written["seeds"][0]["variants"].items():
        _check_run(name, run)
        assert run["probe"]["grad_norm"] and all(math.isfinite(g) for g in run["probe"]["grad_norm"]), name
    for name in ("block", "full"):
        attention = written["seeds"][0]["variants"][name]["probe"]["depth_attention"]
        assert all(math.isclose(sum(row), 1.0, rel_tol=1e-4) for row in attention), name
    for name, run in written["retrofit"]["variants"].items():
        _check_run(f"retrofit {name}", run)
    for png in results["plots"].values():
        assert (tmp_path / png).stat().st_size > 0


def test_reused_converted_graph_carries_each_models_own_weights():
    """The study converts once per kind and loads later seeds' weights by name."""
    cfg = train_lm.quick_config(train_lm.StudyConfig())
    x = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len))
    factory = train_lm.Variants(cfg)
    first, converted_first = factory.build("block", train_lm.build_baseline(cfg, seed=0), x)
    base = train_lm.build_baseline(cfg, seed=1)
    second, converted_second = factory.build("block", base, x)
    assert converted_first and not converted_second
    with torch.no_grad():
        assert torch.allclose(second(x), base(x), atol=1e-2)  # paper mode: equal up to the norms' eps
        assert not torch.allclose(second(x), first(x), atol=1e-2)
    assert all(torch.equal(p, q) for p, q in zip(second.attnres.parameters(), first.attnres.parameters()))
