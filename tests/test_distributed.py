"""A converted model on torch.distributed: DDP, FSDP2 per layer, activation checkpointing, DCP, whole-model saves.

Two gloo processes (CPU) run every scenario of ``tests/dist_scenarios.py`` (a module
fixture spawns a launcher that converts the models once and forks the two workers;
imports and captures are paid once), each against a one-process reference trained on
the same global batches: losses equal to 1e-5 relative in fp32. The tests below read
the scenarios' results.
"""

from __future__ import annotations

import json
import socket

import dist_scenarios as scenarios
import pytest
import torch

import attnres_rewrite as ar

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

DEADLINE_S = 420  # the workers; their collectives time out after scenarios.TIMEOUT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import multiprocessing

    out = tmp_path_factory.mktemp("distributed")
    args = (str(out), _free_port(), list(scenarios.SCENARIOS), DEADLINE_S)
    launcher = multiprocessing.get_context("spawn").Process(target=scenarios.launch, args=args)
    launcher.start()
    launcher.join(DEADLINE_S + 30)
    if launcher.is_alive():
        launcher.kill()
        pytest.fail(f"the distributed launcher did not finish within {DEADLINE_S} s")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(scenarios.WORLD)]
    assert launcher.exitcode == 0, f"launcher exit code {launcher.exitcode}: {ranks}"
    for rank in ranks:
        assert "setup" not in rank, rank["setup"]["error"]
    prepared = json.loads((out / "launcher.json").read_text())
    print(prepared, {k: round(v["cpu_s"], 1) for k, v in ranks[0].items()})
    return ranks


def _ok(results, name):
    for rank, result in enumerate(results):
        assert result[name]["ok"], f"rank {rank}:\n{result[name]['error']}"
    return results[0][name]


def _same_losses(got, want, rtol=1e-5):
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=rtol, atol=0)


def test_ddp_trains_like_one_process(results):
    r = _ok(results, "ddp")
    _same_losses(r["losses"], r["reference"])


def test_fsdp_per_layer_shards_every_parameter_and_gathers_each_layer_when_it_runs(results):
    r = _ok(results, "fsdp")
    _same_losses(r["losses"], r["reference"])
    assert all(r["sharded"].values())  # attnres.* included: they are in the root's group
    assert {"attnres.layers.query", "attnres.layers.key_gain"} <= set(r["sharded"])
    # at the root's pre-forward both layers are sharded; each is gathered when it runs, and resharded after
    assert r["events"] == [
        ["root", [False, False]],
        ["layer0", [True, False], "LayerProgram"],
        ["layer1", [False, True], "LayerProgram"],
    ]
    assert r["programs"] == 1  # sharding does not change what the layers compute: the unsharded program serves


def test_whole_model_directory_from_a_sharded_run(results):
    r = _ok(results, "fsdp")
    assert r["files"] == ["attnres_model.json", "model.safetensors"]
    assert r["whole_max_rel_diff"] and max(r["whole_max_rel_diff"].values()) < 1e-4  # vs the one-process weights


def test_distributed_checkpoint_resumes_on_the_same_and_another_world_size(results):
    same = _ok(results, "dcp_resume")
    _same_losses(same["losses"], same["reference"])
    assert "another conversion" in same["refused_other_plan"]
    other = _ok(results, "dcp_other_world_size")
    assert other["mesh_size"] == 1
    _same_losses(other["losses"], other["reference"])


def test_activation_checkpointing_per_layer(results):
    r = _ok(results, "checkpointed")
    assert r["names_equal"] and r["state_dict_names_equal"]
    assert max(r["grad_rel_diffs"].values()) <= 1e-6
    assert r["layer_calls"] == ["LayerProgram"] * 4  # 2 layers, each run in the forward and again in the backward
    assert r["new_programs"] == 0  # wrapping changes no program: the one captured unwrapped runs
    _same_losses(r["fsdp_losses"], r["reference"])


def test_meta_device_path_converts_shards_materialises_and_trains(results):
    r = _ok(results, "meta_path")
    assert r["sharded"] and r["programs"] == 1  # captured once, on the sharded model (meta stand-ins)
    assert "no weights for norm.weight" in r["refused_missing_weight"] and r["still_on_meta_after_refusal"]
    _same_losses(r["losses"], r["reference"])


def test_mixed_precision_layers_compute_in_bf16_on_a_program_captured_in_bf16(results):
    r = _ok(results, "mixed_precision")
    assert r["new_programs"] == 1  # the bf16 call kind is captured, under sharding and checkpoint wrappers
    assert r["layer_param_dtype_when_called"] == ["torch.bfloat16"]
    assert r["layer_graph_bf16"] and not r["layer_graph_on_meta"]
    assert r["param_dtype"] == r["grad_dtype"] == "torch.float32"  # sharded fp32 parameters and gradients
    _same_losses(r["losses"], r["reference"], rtol=5e-3)  # bf16 compute


def test_pipeline_stages_carry_the_block_state_and_train_like_one_process(results):
    r = _ok(results, "pipeline")
    gpipe = r["gpipe"]
    _same_losses(gpipe["losses"], r["reference"])
    first, second = gpipe["stages"]
    assert first["layers"] == ["layers.0", "layers.1"] and second["layers"] == ["layers.2", "layers.3"]
    # at the block end (2 blocks of 2 layers): b_0 (the embedding) and b_1 cross, no partial sum
    assert first["sent"] == second["inputs"] and len(first["sent"]) == 2 and first["sent"][0] == "embedding"
    rows, seq, dim = 2, scenarios.SEQ, 48  # a micro-batch
    assert gpipe["sent_bytes_per_microbatch"]["0"] == 2 * rows * seq * dim * 4


def test_virtual_stages_send_each_block_once_per_pair_of_ranks(results):
    r = _ok(results, "pipeline")
    cached, resend = r["cached"], r["resend"]
    _same_losses(cached["losses"], r["reference"][:2])
    _same_losses(resend["losses"], r["reference"][:1])
    # 4 stages of one layer on ranks 0, 1, 0, 1
    assert [s["rank"] for s in cached["stages"]] == [0, 1, 0, 1]
    assert [len(s["inputs"]) for s in resend["stages"][1:]] == [2, 2, 3]  # the whole live state at each boundary
    assert [len(s["inputs"]) for s in cached["stages"][1:]] == [2, 1, 1]  # only what the receiving rank lacks
    assert cached["stages"][3]["cache_reads"] == ["embedding", cached["stages"][1]["sent"][0]]
    sent = {}
    for rank in results:
        for key in ("cached", "resend"):
            for stage, nbytes in rank["pipeline"][key]["sent_bytes_per_microbatch"].items():
                sent.setdefault(key, {})[int(stage)] = nbytes
    unit = 2 * scenarios.SEQ * 48 * 4  # one (2, SEQ, 48) fp32 tensor
    assert [sent["resend"][s] // unit for s in range(3)] == [2, 2, 3]
    assert [sent["cached"][s] // unit for s in range(3)] == [2, 1, 1]


def test_the_distributed_example_trains(results):
    r = _ok(results, "example")
    assert r["captures"] == 0
    assert r["losses"][-1] < r["losses"][0]
    assert r["lines"][0].startswith("FSDP2 on 2 rank(s) (cpu)")
    assert any(line.startswith("step 6/6") for line in r["lines"]) and r["lines"][-1].startswith("final loss")


# --------------------------------------------------------------------------------------
# pieces that need no process group


def test_meta_device_constants_are_retargeted_in_every_graph():
    from torch import fx

    from attnres_rewrite.runtime.distributed import retarget_devices

    graph = fx.Graph()
    x = graph.placeholder("x")
    made = graph.call_function(torch.ones, ((2,),), {"device": torch.device("meta")})
    moved = graph.call_function(torch.ops.aten.to.device, (x, torch.device("meta"), torch.float32))
    kept = graph.call_function(torch.zeros, ((2,),), {"device": torch.device("cpu")})
    graph.output((made, moved, kept))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert retarget_devices(gm, torch.device("cpu")) == 2
    out = gm(torch.ones(2, dtype=torch.float64))
    assert all(t.device.type == "cpu" for t in out) and out[1].dtype == torch.float32


def test_wrapped_layers_are_found_and_do_not_change_the_state_key():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from attnres_rewrite.runtime.converted import state_key
    from attnres_rewrite.runtime.distributed import innermost, state_modules, unwrapped_layers

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    attnres = torch.nn.Module()
    key = state_key(state_modules(model, attnres))
    inner = model.layers[1]
    model.layers[1] = checkpoint_wrapper(inner)
    assert innermost(model.layers[1]) is inner and innermost(inner) is inner
    listed = state_modules(model, attnres)
    assert model.layers[1] not in listed and inner in listed and attnres in listed
    assert state_key(state_modules(model, attnres)) == key
    inner.eval()  # the wrapped layer's own state still counts
    assert state_key(state_modules(model, attnres)) != key
    with unwrapped_layers(model):
        assert model.layers[1] is inner
    assert innermost(model.layers[1]) is inner and model.layers[1] is not inner


def test_block_boundaries_fall_on_block_ends():
    from attnres_rewrite.distributed.pipeline import block_boundaries

    blocks = [[0, 4], [4, 8], [8, 12], [12, 16]]  # 8 layers of 2 sublayers, 4 blocks
    assert block_boundaries(blocks, 2, 2) == [4]
    assert block_boundaries(blocks, 2, 4) == [2, 4, 6]
    with pytest.raises(ar.errors.InvalidInputError, match="cannot make 8 stages"):
        block_boundaries(blocks, 2, 8)
