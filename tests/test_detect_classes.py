"""Detection by what the graph computes, one small hand-written model per class of miss.

Each model is the minimal form of a pattern found in architectures outside the test
suite: a norm that casts back with ``type_as``, parallel branches with and without
dropout around their sum, a sum of experts inside one MLP module, a branch that pads
and slices the sequence, a model that reads its input's shape. The reference for each
is what the stream is (kind and sublayers) and an exact-mode conversion equal to the
original.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite.api import fresh_inputs

D = 16


def _ids(seq=16):
    return torch.randint(0, 50, (2, seq))


class CastBackNorm(nn.Module):
    """RMSNorm with a ``(1 + w)`` gain, computed in fp32 and cast back with ``type_as``."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(D)), eps

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)).type_as(x)


class InlineNorms(nn.Module):
    """Norms written inline in the layer's forward (no module at all): RMS and LayerNorm-style."""

    def __init__(self, layers=2):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(2 * layers))

    def forward(self, ids):
        x = self.emb(ids)
        for i, f in enumerate(self.fs):
            if i % 2:
                h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, correction=0) + 1e-5)
            else:
                h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            x = x + f(h)
        return x


class Stack(nn.Module):
    def __init__(self, layer, layers=3):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.layers = nn.ModuleList(layer() for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return x


class CastBackLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.f = CastBackNorm(), nn.Linear(D, D)

    def forward(self, x):
        return x + self.f(self.norm(x))


class Parallel(nn.Module):
    """``x + drop(attn(ln(x)) + mlp(ln(x)))``: two sublayers whatever ``drop`` is."""

    def __init__(self, dropout: bool):
        super().__init__()
        self.ln, self.attn, self.mlp = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()

    def forward(self, x):
        h = self.ln(x)
        return x + self.drop(self.attn(h) + self.mlp(h))


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.routed, self.shared = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h):
        return self.routed(h) + self.shared(h)


class ExpertLayer(nn.Module):
    """Attention and an MLP whose output is a sum of experts: two sublayers, not three."""

    def __init__(self):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D), Experts()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PadLayer(nn.Module):
    """Pads the sequence to a multiple of 8 and slices it back: its output length is another expression."""

    def __init__(self):
        super().__init__()
        self.ln, self.f = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        t = x.shape[1]
        pad = (8 - t % 8) % 8
        h = self.ln(x)
        if pad > 0:
            h = nn.functional.pad(h, (0, 0, 0, pad))
        return x + self.f(h)[:, :t]


class ShapeReader(nn.Module):
    """A stream that starts at a graph input whose shape the model reads."""

    def __init__(self, layers=3):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(layers))

    def forward(self, h):
        b, t, d = h.shape
        for n, f in zip(self.norms, self.fs):
            h = h + f(n(h))
        return h.reshape(b * t, d)


CASES = {
    "cast_back_norm": (lambda: Stack(CastBackLayer), lambda: (_ids(),), 3, "prenorm"),
    "inline_norms": (InlineNorms, lambda: (_ids(),), 4, "prenorm"),
    "parallel_with_dropout": (lambda: Stack(lambda: Parallel(True), 2), lambda: (_ids(),), 4, "prenorm"),
    "parallel": (lambda: Stack(lambda: Parallel(False), 2), lambda: (_ids(),), 4, "prenorm"),
    "experts_inside_mlp": (lambda: Stack(ExpertLayer, 2), lambda: (_ids(),), 4, "prenorm"),
    "pad_and_slice_t16": (lambda: Stack(PadLayer), lambda: (_ids(16),), 3, "prenorm"),
    "pad_and_slice_t13": (lambda: Stack(PadLayer), lambda: (_ids(13),), 3, "prenorm"),
    "input_shape_read": (ShapeReader, lambda: (torch.randn(2, 5, D),), 3, "prenorm"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stream_kind_sublayers_and_exact_conversion(name):
    build, inputs, sublayers, kind = CASES[name]
    torch.manual_seed(0)
    model, example = build().eval(), inputs()
    (stream,) = ar.inspect(model, example).streams
    assert (stream.kind, stream.num_sublayers) == (kind, sublayers), stream
    assert len(set(stream.sublayers)) == sublayers  # no two sublayers share a module path
    converted = ar.convert(model, example, mode="exact", num_blocks=2)
    report = ar.equivalence(model, converted, example)
    assert report.max_abs <= 1e-5 * report.max_ref, report


def test_report_says_which_norms_were_found_and_how():
    (inline,) = ar.inspect(InlineNorms().eval(), (_ids(),)).streams
    assert [n.split(" ")[-1] for n in inline.norms] == ["(layer)", "(rms)"]
    (cast,) = ar.inspect(Stack(CastBackLayer).eval(), (_ids(),)).streams
    assert cast.norms == [f"layers.{i}.norm (rms)" for i in range(3)]
    assert cast.eps == 1e-6


def test_dropout_around_parallel_branches_applies_to_each_branch_in_training():
    """The sum's dropout becomes one dropout per branch: active in train mode, identity in eval."""
    torch.manual_seed(0)
    model = Stack(lambda: Parallel(True), 2).eval()
    ids = _ids()
    converted = ar.convert(model, (ids,), mode="exact")
    converted.train()
    with torch.no_grad():
        assert not torch.equal(converted(ids), converted(ids))
        converted.eval()
        torch.testing.assert_close(converted(ids), model(ids), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# checks that cannot pass vacuously, and inputs the check invents


class RandomMasking(nn.Module):
    """Drops embedding rows at random, in eval mode too: not a function of its inputs alone."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(3))
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(3))

    def forward(self, ids):
        x = self.emb(ids) * (torch.rand(ids.shape) > 0.3).unsqueeze(-1)
        for n, f in zip(self.norms, self.fs):
            x = x + f(n(x))
        return x


class ZeroHead(RandomMasking):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids):
        x = self.emb(ids)
        for n, f in zip(self.norms, self.fs):
            x = x + f(n(x))
        return self.head(x)


class ImageTokens(Stack):
    """Needs exactly ``n`` image tokens (id 49) per row, as a multimodal model needs one per image patch."""

    def __init__(self, n=2):
        super().__init__(CastBackLayer, 2)
        self.n = n

    def forward(self, ids):
        # like a multimodal model's count check: eager only (a trace skips it, as those models' checks do)
        if not torch.compiler.is_compiling() and not bool(((ids == 49).sum(-1) == self.n).all()):
            raise ValueError(f"each row needs exactly {self.n} image tokens")
        return super().forward(ids)


def _image_ids(n, batch=2, seq=8, start=0):
    ids = torch.randint(0, 49, (batch, seq))
    ids[:, start : start + n] = 49
    return ids


def test_equivalence_runs_both_models_on_the_same_random_numbers():
    torch.manual_seed(0)
    model = RandomMasking().eval()
    converted = ar.convert(model, (_ids(),), mode="exact")
    report = ar.equivalence(model, converted, (_ids(),))
    assert report.max_abs <= 1e-5 * report.max_ref and not report.inconclusive


def test_equivalence_on_a_constant_output_is_inconclusive():
    torch.manual_seed(0)
    model = ZeroHead().eval()
    converted = ar.convert(model, (_ids(),), mode="exact")
    report = ar.equivalence(model, converted, (_ids(),))
    assert report.max_ref == 0 and report.inconclusive and "does not vary with the input" in report.reason
    assert report.stream_rms > 0


def test_fresh_inputs_keep_a_span_of_image_tokens():
    """Class D: ids repeated within a row are structure (image tokens): kept in place, never drawn elsewhere."""
    torch.manual_seed(0)
    ids = _image_ids(3)
    fresh = fresh_inputs((ids,))[0]
    assert fresh.shape == (3, 11) and torch.equal((fresh == 49).sum(-1), torch.tensor([3, 3, 3]))
    assert torch.equal(fresh[:, :3], torch.full((3, 3), 49))
    model = ImageTokens(3).eval()
    converted = ar.convert(model, (ids,), mode="exact")
    report = ar.equivalence(model, converted, (ids,))
    assert report.inputs == "fresh" and report.input_shapes == [[3, 11]]
    assert report.max_abs <= 1e-5 * report.max_ref


def test_inputs_the_check_cannot_resample_fall_back_to_the_example_or_the_callers():
    """One image token per row looks like text: resampling loses it, so the check says it ran on the example."""
    torch.manual_seed(0)
    ids = _image_ids(1)
    model = ImageTokens(1).eval()
    converted = ar.convert(model, (ids,), mode="exact")
    report = ar.equivalence(model, converted, (ids,))
    assert report.inputs == "example" and report.max_abs <= 1e-5 * report.max_ref
    given = ar.equivalence(model, converted, (ids,), check_inputs=(_image_ids(1, seq=11, start=3),))
    assert given.inputs == "given" and given.input_shapes == [[2, 11]]
    with pytest.raises(ar.errors.InvalidInputError, match="could not run the models on check inputs.*image tokens"):
        ar.equivalence(model, converted, (ids,), check_inputs=(torch.randint(0, 49, (2, 8)),))


# --------------------------------------------------------------------------------------
# the CLI: failed checks write nothing, static axes said loudly, check inputs, one report
# schema, blocks of whole layers. MODEL is a factory of this module (pytest puts tests/ on
# sys.path, so ``test_detect_classes:NAME`` imports it).


class Scan(RandomMasking):
    """A recurrence over time written as a Python loop: the trace unrolls it, fixing T."""

    def forward(self, ids):
        x = self.emb(ids)
        for n, f in zip(self.norms, self.fs):
            h = f(n(x))
            steps = [h[:, 0]]
            for t in range(1, h.shape[1]):
                steps.append(0.5 * steps[-1] + h[:, t])
            x = x + torch.stack(steps, 1)
        return x


def zero_head():
    torch.manual_seed(0)
    return ZeroHead().eval(), (_ids(),)


def image_tokens():
    torch.manual_seed(0)
    return ImageTokens(1).eval(), (_image_ids(1),)


def scan():
    torch.manual_seed(0)
    return Scan().eval(), (_ids(8),)


def parallel_layers():
    torch.manual_seed(0)
    return Stack(lambda: Parallel(False), 5).eval(), (_ids(),)


def _cli(*args: str):
    from typer.testing import CliRunner

    from attnres_rewrite.cli.app import app

    return CliRunner().invoke(app, list(args))


def _json(result) -> dict:
    import json

    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_convert_writes_nothing_when_its_own_check_fails(tmp_path):
    """Class C: a check that cannot tell (constant output) is a failed check: exit 1, no DIR, unless asked."""
    out = tmp_path / "out"
    refused = _cli("convert", "test_detect_classes:zero_head", "-o", str(out), "--mode", "exact")
    assert refused.exit_code == 1, refused.stderr
    assert "inconclusive" in refused.stderr and "--write-on-failed-check" in refused.stderr
    assert not out.exists()
    args = ("convert", "test_detect_classes:zero_head", "-o", str(out), "--mode", "exact", "--json")
    written = _json(_cli(*args, "--write-on-failed-check"))
    assert written["check_passed"] is False and written["check_inconclusive"] is True
    assert written["max_ref"] == 0.0 and "does not vary with the input" in written["check_failure"]
    assert written["stream_rms"] > 0
    assert (out / "attnres_config.json").is_file()


def test_the_check_rule_and_the_paper_mode_hint():
    from types import SimpleNamespace

    from attnres_rewrite.cli.commands.converting import check_failure, paper_mode_hint

    check = {"finite": True, "inconclusive": False, "max_abs": 2e-3, "max_ref": 1.0}
    assert check_failure(check, "paper", torch.float32) is None  # paper mode changes the function by design
    assert "exact mode differs" in check_failure(check, "exact", torch.float32)
    assert check_failure(check, "exact", torch.bfloat16) is None  # within bf16 rounding of a deep sum
    assert "NaN" in check_failure({**check, "finite": False}, "paper", torch.float32)
    prenorm = SimpleNamespace(streams=[SimpleNamespace(name="layers", kind="prenorm", eps=1e-6)])
    hint = paper_mode_hint("paper", 0.2, prenorm, 0.02)
    assert "although its streams are pre-norm" in hint and "stream RMS 0.02, key-norm eps 1e-06" in hint
    assert "without pre-norm" not in hint
    additive = SimpleNamespace(streams=[SimpleNamespace(name="h", kind="additive", eps=1e-6)])
    assert "expected for streams without pre-norm (h)" in paper_mode_hint("paper", 0.2, additive, 0.02)
    assert paper_mode_hint("paper", 1e-5, prenorm, 0.02) is None and paper_mode_hint("exact", 0.2, prenorm, 1) is None


def test_check_inputs_replace_the_ones_the_check_cannot_invent(tmp_path):
    """Class D: image tokens a resampling breaks; the check falls back loudly, or runs on the user's inputs."""
    from safetensors.torch import save_file

    fallback = _cli("convert", "test_detect_classes:image_tokens", "-o", str(tmp_path / "a"), "--json")
    assert _json(fallback)["check_inputs"] == "example"
    assert "ran on the example inputs themselves" in fallback.stderr
    other = _image_ids(1, batch=3, seq=11, start=4)
    save_file({"0": other}, tmp_path / "check.safetensors")
    args = ("convert", "test_detect_classes:image_tokens", "--mode", "exact", "--json")
    given = _json(_cli(*args, "-o", str(tmp_path / "b"), "--check-inputs", str(tmp_path / "check.safetensors")))
    assert given["check_inputs"] == "given" and given["check_input_shapes"] == [[3, 11]] and given["check_passed"]
    save_file({"0": other, "mask": other.clone()}, tmp_path / "mixed.safetensors")
    mixed = _cli(*args, "-o", str(tmp_path / "c"), "--check-inputs", str(tmp_path / "mixed.safetensors"))
    assert mixed.exit_code == 2 and "mixes positional (0) and keyword tensors" in mixed.stderr
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04not safetensors")
    broken = _cli(*args, "-o", str(tmp_path / "c"), "--check-inputs", str(tmp_path / "pickle.safetensors"))
    assert broken.exit_code == 2 and "is not a safetensors file" in broken.stderr


def test_static_axes_are_said_loudly_by_inspect_and_convert(tmp_path):
    """Class B: a Python loop over time pins T; both commands' JSON and stderr say which axis."""
    inspected = _cli("inspect", "test_detect_classes:scan", "--json")
    assert _json(inspected)["static_axes"] == ["ids axis 1 = 8"]
    assert "warning:" in inspected.stderr and "ids axis 1 = 8" in inspected.stderr
    converted = _cli("convert", "test_detect_classes:scan", "-o", str(tmp_path / "o"), "--json")
    assert "ids axis 1 = 8" in _json(converted)["static_axes"]  # and the check's own length, traced again
    assert "warning:" in converted.stderr


def test_one_report_schema_and_blocks_of_whole_layers(tmp_path):
    """Classes E and F: lists and their num_ counts under one format; --layers-per-block never splits a layer."""
    inspected = _json(_cli("inspect", "test_detect_classes:parallel_layers", "--layers-per-block", "2", "--json"))
    out = tmp_path / "o"
    args = ("convert", "test_detect_classes:parallel_layers", "-o", str(out), "--layers-per-block", "2", "--json")
    converted = _json(_cli(*args))
    for report in (inspected, converted):
        assert report["report_format"] == 1
        (stream,) = report["streams"]
        assert stream["sublayers"] == [f"layers.{i}.{m}" for i in range(5) for m in ("attn", "mlp")]
        assert stream["num_sublayers"] == 10 and stream["num_blocks"] == 3
        assert stream["blocks"] == [[0, 4], [4, 8], [8, 10]]
    assert converted["num_sublayers"] == 10 and converted["num_blocks"] == 3 and converted["num_streams_converted"] == 1
    import json

    assert json.loads((out / "report.json").read_text())["streams"] == converted["streams"]
    plan = json.loads((out / "attnres_config.json").read_text())["plan"]
    assert plan["layers_per_block"] == 2 and plan["streams"][0]["blocks"] == [[0, 4], [4, 8], [8, 10]]
    both = _cli("convert", "test_detect_classes:parallel_layers", "-o", str(tmp_path / "x"), "-l", "2", "-n", "2")
    assert both.exit_code == 2 and "--blocks and --layers-per-block are alternatives" in both.stderr
