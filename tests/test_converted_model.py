"""The converted model is still the user's model: same class, any call, generate, dtypes, modes, copies.

References are the original models (``exact`` mode equals them at conversion) and the
converted model itself called another way (a cache-free ``generate`` for ``paper``
mode, each row of a padded batch alone).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite import samples
from attnres_rewrite.api import programs
from attnres_rewrite.errors import InvalidInputError

transformers = pytest.importorskip("transformers")
import tiny_hf  # noqa: E402  (needs transformers)


def _llama(layers=2):
    torch.manual_seed(0)
    model, inputs = tiny_hf.llama(layers)
    model.eval()
    model.config.use_cache = True
    model.generation_config.use_cache = True
    model.generation_config.pad_token_id = 0
    return model, inputs


@pytest.fixture(scope="module")
def llama():
    """A tiny HF Llama and its exact-mode conversion (module scope: captures are shared by the tests)."""
    model, inputs = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    return model, converted, inputs


def _ids(batch, seq):
    return torch.randint(1, tiny_hf.VOCAB, (batch, seq))


# --------------------------------------------------------------------------------------
# same model, same class


def test_same_class_attributes_and_parameters(llama):
    model, converted, _ = llama
    assert type(converted) is type(model) and converted is not model
    config = converted.config.to_dict()
    assert config.pop("attnres")["plan"] == converted.attnres.plan.to_dict()  # save_pretrained records it
    assert config == model.config.to_dict()
    assert type(converted.model.layers[0]) is type(model.model.layers[0])
    assert converted.num_parameters() == model.num_parameters() + sum(p.numel() for p in converted.attnres.parameters())
    names = set(converted.state_dict())
    (plan,) = converted.attnres.plan.streams
    assert (
        names - set(model.state_dict())
        == {plan.query, plan.key_gain}
        == {
            "attnres.model_layers.query",
            "attnres.model_layers.key_gain",
        }
    )
    param_names = {n for n, _ in converted.named_parameters()}
    assert {plan.query, plan.key_gain} <= param_names  # optimizers see them
    assert plan.owner == "model"  # LlamaModel holds the stream; the LM head runs the model's own code
    assert ar.is_converted(converted) and not ar.is_converted(model)


def test_layers_are_called_as_modules(llama):
    _, converted, inputs = llama
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.append(i))
        for i, layer in enumerate(converted.model.layers)
    ]
    try:
        with torch.no_grad():
            converted(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert seen == [0, 1]


def test_a_copy_taken_before_a_capture_runs_the_shared_program(llama):
    _, converted, inputs = llama
    with torch.no_grad():
        want = converted(**inputs).logits
    clone = copy.deepcopy(converted)  # copies share programs; the layers' overrides come with the program's first run
    for layer in clone.model.layers:
        del layer.forward  # as in a copy taken before the program that installs them was captured
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, want, rtol=0, atol=0)


def test_a_layer_whose_override_went_gets_it_back_on_the_next_call():
    model, inputs = _llama()
    converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    with torch.no_grad():
        want = converted(**inputs).logits
        converted(**inputs)  # the owner now remembers the program's layers
        del converted.model.layers[1].forward
        torch.testing.assert_close(converted(**inputs).logits, want, rtol=0, atol=0)
    assert "forward" in vars(converted.model.layers[1])


def test_a_layer_swapped_in_without_registration_gets_the_override():
    """``ModuleList.insert`` and quantization's module swaps write ``_modules`` directly: no hook fires."""
    model, inputs = _llama()
    converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    with torch.no_grad():
        want = converted(**inputs).logits
        layers = converted.model.layers
        fresh = copy.deepcopy(layers[1])  # (copying registers modules: done before the owner caches its layers)
        del fresh.forward  # a module that never ran under the program
        converted(**inputs)
        layers._modules["1"] = fresh
        torch.testing.assert_close(converted(**inputs).logits, want, rtol=0, atol=0)
    assert "forward" in vars(fresh)


def test_state_registered_after_the_first_call_changes_the_program_key():
    """A buffer registered on a module that held no tensors is part of the next call's key (a new dtype here)."""
    from attnres_rewrite.passes.call_inputs import CallInputs
    from attnres_rewrite.runtime.converted import owners

    model, inputs = _llama()
    converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    owner = owners(converted)["model"]
    with torch.no_grad():
        converted(**inputs)
    call = CallInputs.of((), dict(inputs))
    before = owner.kind(call)
    bare = converted.model.layers[0].mlp.act_fn
    assert not bare._parameters and not bare._buffers
    bare.register_buffer("scale", torch.ones(1, dtype=torch.float64))
    after = owner.kind(call)
    assert (torch.float64, -1) in after[-1][1] and (torch.float64, -1) not in before[-1][1]


def test_conversion_leaves_the_original_alone_and_refuses_a_second_one(llama):
    model, converted, inputs = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = copy.deepcopy(converted).train()
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    trained(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "attnres") and "forward" not in vars(model.model)
    with pytest.raises(InvalidInputError, match="already converted"):
        ar.convert(converted, inputs)


def test_convert_in_place_returns_the_same_object():
    model, inputs = samples.get("llama", layers=1, dropout=0.0)
    reference = copy.deepcopy(model)
    out = ar.convert_(model, inputs, num_blocks=2, mode="exact")
    assert out is model and ar.is_converted(model)
    ids = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(out(ids), reference(ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# any call


def test_labels_give_the_models_own_loss(llama):
    model, converted, inputs = llama
    with torch.no_grad():
        want = model(**inputs, labels=inputs["input_ids"]).loss
        got = converted(**inputs, labels=inputs["input_ids"]).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_left_padded_batch_gives_each_row_its_own_logits(llama):
    _, converted, _ = llama
    short, long = _ids(1, 4), _ids(1, 7)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = converted(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone_short = converted(input_ids=short).logits
        alone_long = converted(input_ids=long).logits
    torch.testing.assert_close(batch[0, 3:], alone_short[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch[1], alone_long[0], rtol=1e-4, atol=1e-5)


def test_hidden_states_and_tuple_outputs(llama):
    model, converted, inputs = llama
    with torch.no_grad():
        out = converted(**inputs, output_hidden_states=True)
        ref = model(**inputs, output_hidden_states=True)
        tup = converted(**inputs, return_dict=False)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    # exact mode at init: each layer's AttnRes input equals the original stream value
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out.logits)


# --------------------------------------------------------------------------------------
# generate with a KV cache


def test_generate_with_cache_equals_the_original_in_exact_mode(llama):
    model, converted, inputs = llama
    kw = dict(attention_mask=inputs["attention_mask"], max_new_tokens=6, do_sample=False)
    want = model.generate(inputs["input_ids"], **kw)
    got = converted.generate(inputs["input_ids"], **kw)
    assert torch.equal(got, want)
    signatures = [p.signature for p in programs(converted)["model"]]
    decode = [s for s in signatures if "input_ids[2, 1]" in s]
    assert decode and all("cache.layers.0.keys[2, 2, " in s for s in decode)  # decode steps read the cache


def test_generate_in_paper_mode_equals_rerunning_the_prefix():
    model, inputs = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ar.convert(model, inputs, num_blocks=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in converted.attnres.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    kw = dict(attention_mask=inputs["attention_mask"], max_new_tokens=5, do_sample=False)
    cached = converted.generate(inputs["input_ids"], **kw)
    uncached = converted.generate(inputs["input_ids"], use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_a_hand_written_decode_loop_sees_its_own_cache_grow(llama):
    model, converted, _ = llama
    ids = _ids(2, 5)
    cache = transformers.DynamicCache(config=converted.config)
    with torch.no_grad():
        out = converted(input_ids=ids, cache=cache, use_cache=True)
        assert out.cache is cache and cache.get_seq_length() == 5
        step = out.logits[:, -1:].argmax(-1)
        out = converted(input_ids=step, cache=cache, use_cache=True)
        assert out.cache is cache and cache.get_seq_length() == 6
        full = model(input_ids=torch.cat([ids, step], 1)).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-5)


def test_encoder_decoder_generate_equals_the_original():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=tiny_hf.VOCAB, d_model=40, d_kv=10, d_ff=72, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    inputs = {"input_ids": _ids(2, 7), "decoder_input_ids": _ids(2, 5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    assert sorted(s.owner for s in converted.attnres.plan.streams) == ["decoder", "encoder"]
    kw = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)
    want = model.generate(inputs["input_ids"], **kw)
    got = converted.generate(inputs["input_ids"], **kw)
    assert torch.equal(got, want)
    assert any("cache" in p.signature for p in programs(converted)["decoder"])


# --------------------------------------------------------------------------------------
# dtype moves, train/eval, copies


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_moves_keep_the_op_contract(llama, dtype):
    model, converted, inputs = llama
    low = copy.deepcopy(converted).to(dtype)
    reference = copy.deepcopy(model).to(dtype)
    assert all(p.dtype == dtype for p in low.attnres.parameters())
    with torch.no_grad():
        got = low(**inputs).logits
        want = reference(**inputs).logits
        back = low.float()(**inputs).logits
    assert got.dtype == dtype and back.dtype == torch.float32
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(back, reference.float()(**inputs).logits, rtol=1e-4, atol=1e-5)


class DropoutStack(nn.Module):
    def __init__(self, dim=16, layers=3):
        super().__init__()
        self.embed = nn.Embedding(20, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.fs = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.5)) for _ in range(layers))
        self.head = nn.Linear(dim, 20)

    def forward(self, ids):
        x = self.embed(ids)
        for n, f in zip(self.norms, self.fs):
            x = x + f(n(x))
        return self.head(x)


def test_autocast_runs_like_the_original_under_autocast():
    """bf16 autocast on CPU, the first call of the converted model under it (the capture is made with it off).

    Exact mode equals the original, so the converted logits must sit within the
    original's own autocast rounding (its distance from the fp32 logits).
    """
    model, inputs = _llama()
    converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    labels = inputs["input_ids"]
    with torch.no_grad():
        full = model(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            want = model(**inputs).logits
            got = converted(**inputs).logits
        loss = converted(**inputs, labels=labels).loss
        want_loss = model(**inputs, labels=labels).loss
    assert got.dtype == want.dtype == torch.bfloat16
    rounding = (want.float() - full).abs().max().item()
    assert 0 < rounding < 0.05 * full.abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 2 * rounding
    loss.backward()
    torch.testing.assert_close(loss.float(), want_loss.float(), rtol=0.02, atol=0.0)
    grads = {n: p.grad for n, p in converted.attnres.named_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the queries start at zero (exact mode), so only their gradients are non-zero after one step
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("query"))


def test_train_and_eval_switch_dropout():
    torch.manual_seed(0)
    model = DropoutStack().eval()
    ids = torch.randint(0, 20, (2, 6))
    converted = ar.convert(model, (ids,), mode="exact")
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), model(ids), rtol=1e-5, atol=1e-5)
        converted.train()
        a, b = converted(ids), converted(ids)
        assert not torch.equal(a, b)  # dropout is on
        converted.eval()
        torch.testing.assert_close(converted(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_deepcopy_and_pickle_keep_a_working_model():
    torch.manual_seed(0)
    model, inputs = samples.get("llama", layers=2, dropout=0.0)
    converted = ar.convert(model, inputs, mode="exact")
    clone = copy.deepcopy(converted)
    assert programs(clone)[""] == programs(converted)[""] and len(programs(clone)[""]) == 1  # copies share programs
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)  # our own bytes, written just above
    ids = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        for other in (clone, restored):
            torch.testing.assert_close(other(ids), model(ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# shapes that stay dynamic


class Scan(nn.Module):
    """A recurrent sublayer: a Python loop over the sequence (the trace unrolls it)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.cell = nn.Linear(dim, dim)

    def forward(self, x):
        h, outs = torch.zeros_like(x[:, 0]), []
        x = self.norm(x)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(x[:, t]) + h)
            outs.append(h)
        return torch.stack(outs, 1)


class ScanModel(nn.Module):
    def __init__(self, dim=12, layers=2):
        super().__init__()
        self.embed = nn.Embedding(20, dim)
        self.layers = nn.ModuleList(Scan(dim) for _ in range(layers))

    def forward(self, ids, **kwargs):
        x = self.embed(ids) * kwargs.get("scale", 1.0)
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_scan_model_recaptures_per_length_and_says_which_axis_is_static():
    torch.manual_seed(0)
    model = ScanModel().eval()
    converted = ar.convert(model, (torch.randint(0, 20, (2, 5)),), mode="exact")
    with torch.no_grad():
        for shape in [(3, 5), (2, 8), (4, 8)]:
            ids = torch.randint(0, 20, shape)
            torch.testing.assert_close(converted(ids), model(ids), rtol=1e-5, atol=1e-6)
    captured = programs(converted)[""]
    assert len(captured) == 2  # length 5 and length 8; batch stays dynamic
    assert any("ids axis 1 = 5" in axis for axis in captured[0].static_axes)  # named after forward's parameter


def test_a_capture_on_a_view_admits_plain_tensors_later():
    torch.manual_seed(0)
    model, _ = samples.get("llama", layers=2, dropout=0.0)
    ids = torch.randint(0, 97, (4, 16))
    converted = ar.convert(model, (ids[:2, :8],), mode="exact")  # the example is a view of a larger tensor
    with torch.no_grad():
        for x in (torch.randint(0, 97, (3, 9)), ids[1:3]):  # a plain tensor (no base), a view of another shape
            torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(programs(converted)[""]) == 1


def test_keyword_example_landing_in_kwargs_keeps_dynamic_axes():
    torch.manual_seed(0)
    model = samples.get("llama", layers=2, dropout=0.0)[0]

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(kwargs["ids"])

    wrapped = Wrapped(model).eval()
    converted = ar.convert(wrapped, {"ids": torch.randint(0, 97, (2, 7))}, mode="exact")
    with torch.no_grad():
        for shape in [(3, 9), (2, 4)]:
            ids = torch.randint(0, 97, shape)
            torch.testing.assert_close(converted(ids=ids), wrapped(ids=ids), rtol=1e-5, atol=1e-5)
    (only,) = programs(converted)["inner"]  # one program serves every batch and length
    assert only.static_axes == []


# --------------------------------------------------------------------------------------
# whole-model save and load, Trainer


def _perturbed(converted, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in converted.attnres.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return converted


def test_whole_model_save_and_load_hugging_face(llama, tmp_path):
    _, converted, inputs = llama
    trained = _perturbed(copy.deepcopy(converted))
    with torch.no_grad():
        trained.model.norm.weight.mul_(1.5)  # a fine-tuned base weight travels too
    ar.save_converted(trained, tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert {"config.json", "model.safetensors", "attnres_model.json"} <= set(files)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = __import__("json").loads((tmp_path / "model" / "config.json").read_text())
    assert config["attnres"]["plan"]["streams"][0]["owner"] == "model"
    loaded = ar.load_converted(tmp_path / "model")
    assert type(loaded) is type(converted) and loaded.attnres.plan == trained.attnres.plan
    ids = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="not empty; pass overwrite=True"):
        ar.save_converted(trained, tmp_path / "model")
    # plain transformers still reads the base model out of the directory
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model")
    assert not ar.is_converted(base)
    torch.testing.assert_close(base.model.norm.weight, trained.model.norm.weight)


def test_whole_model_save_and_load_plain_module(tmp_path):
    torch.manual_seed(0)
    model, inputs = samples.get("gpt2", layers=2, dropout=0.0)  # tied embedding and head
    converted = _perturbed(ar.convert(model, inputs, num_blocks=2))
    ar.save_converted(converted, tmp_path / "m")
    fresh, _ = samples.get("gpt2", layers=2, dropout=0.0, seed=5)  # other weights: all must come from the files
    loaded = ar.load_converted(tmp_path / "m", fresh)
    assert not ar.is_converted(fresh)  # copied unless inplace=True
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), converted(*inputs), rtol=0, atol=0)


def test_load_refuses_what_is_not_a_safetensors_model(tmp_path, llama):
    _, converted, _ = llama
    with pytest.raises(ar.errors.AdapterError, match="holds no converted model"):
        ar.load_converted(tmp_path)
    ar.save_converted(converted, tmp_path / "m")
    index = {"weight_map": {"model.norm.weight": "pytorch_model.bin"}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    with pytest.raises(ar.errors.AdapterError, match="only .safetensors files"):
        ar.load_converted(tmp_path / "m")


def test_trainer_fine_tunes_and_its_checkpoint_loads(tmp_path):
    model, inputs = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(32):  # a learnable task: a random pattern of 4 tokens, repeated
        ids = torch.randint(1, tiny_hf.VOCAB, (4,), generator=gen).repeat(3)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=1, save_strategy="steps", save_steps=10, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=converted, args=args, train_dataset=data, data_collator=transformers.default_data_collator
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and sum(losses[-3:]) < 0.95 * sum(losses[:3])
    assert converted.attnres.model_layers.query.abs().sum() > 0  # the AttnRes parameters trained too
    loaded = ar.load_converted(tmp_path / "run" / "checkpoint-10")
    ids = _ids(2, 6)
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, converted(ids).logits, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# other kinds of decoders: mixture of experts, parallel residual, state space


def _decoder(kind):
    torch.manual_seed(0)
    if kind == "moe":
        cfg = transformers.MixtralConfig(
            vocab_size=tiny_hf.VOCAB, hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "parallel":
        model = tiny_hf.neox(2)[0]
        model.config.use_cache = True
    else:
        cfg = transformers.MambaConfig(
            vocab_size=tiny_hf.VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4
        )
        model = transformers.MambaForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.mark.parametrize("kind", ["moe", "parallel", "state_space"])
def test_decoder_kinds_keep_loss_and_cached_generation(kind):
    model = _decoder(kind)
    ids = _ids(2, 7)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
        (plan,) = converted.attnres.plan.streams
        assert plan.num_sublayers == (2 if kind == "state_space" else 4)
        with torch.no_grad():
            want, got = model(**inputs, labels=ids), converted(**inputs, labels=ids)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        kw = dict(attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False)
        assert torch.equal(converted.generate(ids, **kw), model.generate(ids, **kw))
    assert any("cache" in p.signature for p in programs(converted)[plan.owner])


def test_hugging_face_gradient_checkpointing_recomputes_each_layer_with_equal_gradients():
    model, inputs = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = _perturbed(ar.convert(model, inputs, num_blocks=2, mode="exact")).train()

    def grads():
        converted.zero_grad(set_to_none=True)
        converted(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in converted.named_parameters() if p.grad is not None}

    want = grads()
    converted.gradient_checkpointing_enable()
    calls = []
    for layer in converted.model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda fn, *a, inner=inner, **k: calls.append(1) or inner(fn, *a, **k)
    got = grads()
    assert len(calls) == len(converted.model.layers)  # each layer's program ran under checkpoint
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_move_to_cuda_captures_there(llama):
    model, converted, inputs = llama
    on_gpu, reference = copy.deepcopy(converted).to("cuda"), copy.deepcopy(model).to("cuda")
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        got = on_gpu(**cuda_inputs).logits
        want = reference(**cuda_inputs).logits
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    kw = dict(attention_mask=cuda_inputs["attention_mask"], max_new_tokens=4, do_sample=False)
    assert torch.equal(
        on_gpu.generate(cuda_inputs["input_ids"], **kw), reference.generate(cuda_inputs["input_ids"], **kw)
    )
