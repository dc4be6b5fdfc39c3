"""Factorisation methods and rank allocation on the real stories260K (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from converters.convert import ConversionError, ConvertOptions, calibration_streams, convert
from converters.cli import DATA
from tests.helpers import PLAIN_SVD, load_hf, load_latent

CAL = str(DATA / "text" / "tinystories_a.txt")
CAL2 = str(DATA / "text" / "tinystories_sample.txt")
EVAL = DATA / "text" / "tinystories_sample.txt"
IDS = torch.tensor([[1, 403, 407, 261, 378, 11, 300, 284, 266, 352, 409, 282]])


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    return import_llama2c(*packaged_stories260k(), tmp_path_factory.mktemp("s") / "stories260K")


@pytest.fixture(scope="module")
def windows(stories):
    from transformers import AutoTokenizer

    from latentkv.text import load_eval_windows

    return load_eval_windows(EVAL, AutoTokenizer.from_pretrained(stories), 512)


def _convert(stories, out, **kw):
    kw.setdefault("calibration_text", CAL)
    kw.setdefault("calibration_samples", 16)
    convert(stories, out, ConvertOptions(**{**PLAIN_SVD, **kw}), overwrite=True, progress=False)
    return out


def _ppl(model_dir, windows):
    from latentkv.evaluate import perplexity

    return perplexity(load_latent(model_dir), windows, batch_size=4, progress=False)


def test_root_covariance_beats_plain_svd(stories, windows, tmp_path):
    svd = _ppl(_convert(stories, tmp_path / "svd", rope_mode="full", kv_ratio=0.5, method="svd"), windows)
    root = _ppl(_convert(stories, tmp_path / "root", rope_mode="full", kv_ratio=0.5, method="activation",
                         preconditioner="root_covariance"), windows)
    assert root < svd, (root, svd)


FULL_RANK = [
    dict(method="svd"),
    *[dict(method="activation", preconditioner=p)
      for p in ("identity", "diag_hessian", "diag_l1", "diag_l2", "covariance", "root_covariance")],
    dict(method="latentllm", svd="split"),
    dict(method="activation", rank_allocation="budgeted"),
    dict(method="svd", rank_allocation="lorc"),
]


@pytest.mark.parametrize("kw", FULL_RANK, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_every_method_is_exact_at_full_rank(stories, tmp_path, kw):
    out = _convert(stories, tmp_path / "out", rope_mode="full", kv_ratio=1.0, **kw)
    diff = (load_latent(out)(IDS).logits - load_hf(stories)(IDS).logits).abs().max().item()
    assert diff < 1e-4
    method = json.loads((out / "config.json").read_text())["latent_kv"]["method"]
    assert method["params"]["method"] == kw["method"]


def test_latentllm_partial_values_only_is_exact(stories, tmp_path):
    # all pairs kept: no NoPE key dims, the latent holds values only (output-aware value latent)
    out = _convert(stories, tmp_path / "out", rope_mode="partial", rope_pairs=4, kv_ratio=1.0, method="latentllm", svd="split")
    assert (load_latent(out)(IDS).logits - load_hf(stories)(IDS).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("alloc", ["lorc", "budgeted", "care"])
def test_allocated_ranks_are_recorded_and_meet_the_budget(stories, tmp_path, alloc):
    out = _convert(stories, tmp_path / "out", rope_mode="full", kv_ratio=0.375, method="activation", rank_allocation=alloc)
    layers = json.loads((out / "config.json").read_text())["latent_kv"]["layers"]
    widths = [layer["latent"]["v_rank"] for layer in layers]  # joint: one latent of v_rank values
    uniform = round(0.375 * 64)
    if alloc in ("budgeted", "care"):
        assert sum(widths) == 5 * uniform
        assert len(set(widths)) > 1
        if alloc == "care":  # CARE's bounds: half to twice the uniform width
            assert all(uniform // 2 <= w <= 2 * uniform for w in widths)
    else:
        assert sum(widths) <= 5 * uniform
        assert widths == sorted(widths, reverse=True)  # LoRC: non-increasing with depth


def test_methods_need_calibration(stories, tmp_path):
    from converters.options import DEFAULT_CALIBRATION_TEXTS

    assert ConvertOptions(method="activation").needs_calibration()
    assert ConvertOptions(rank_allocation="budgeted", rope_mode="full", method="svd").needs_calibration()
    assert not ConvertOptions(rope_mode="full", method="svd", refine_steps=0).needs_calibration()
    assert ConvertOptions(rope_mode="full", method="svd").needs_calibration()  # the refinement runs on calibration text
    # no calibration text given: the shipped C4 sample and WikiText-2 validation text are used
    assert ConvertOptions().calibration_paths() == list(DEFAULT_CALIBRATION_TEXTS)
    assert all(p.is_file() for p in DEFAULT_CALIBRATION_TEXTS)
    convert(stories, tmp_path / "x", ConvertOptions(rope_mode="full", kv_ratio=0.5, calibration_samples=4), progress=False)
    assert json.loads((tmp_path / "x" / "config.json").read_text())["latent_kv"]["method"]["name"] == "mha2mla+activation-svd"
    with pytest.raises(ConversionError, match="split"):
        convert(stories, tmp_path / "x", ConvertOptions(rope_mode="full", kv_ratio=0.5, method="latentllm",
                                                      calibration_text=CAL), progress=False)


def test_cli_method_flags(stories, tmp_path):
    from converters.cli import main

    out = tmp_path / "cli"
    assert main(["convert", str(stories), str(out), "--rope-mode", "full", "--kv-ratio", "0.5", "--method", "activation",
                 "--preconditioner", "diag_l2", "--damping", "0.05", "--rank-allocation", "budgeted",
                 "--calibration-text", CAL, "--calibration-text", CAL2, "--calibration-samples", "8"]) == 0
    method = json.loads((out / "config.json").read_text())["latent_kv"]["method"]
    assert method["params"]["calibration_text"] == [CAL, CAL2]  # the flag repeats: the texts are mixed
    assert method["name"] == "mha2mla+activation-svd"
    assert method["params"]["preconditioner"] == "diag_l2" and method["params"]["damping"] == 0.05
    assert method["params"]["rank_allocation"] == "budgeted"


def test_nope_scaling_fit_beats_plain_nope(stories, windows, tmp_path):
    """Shared RoPE (8 components) at a 50% cache: fitted NoPE factors vs MHA2MLA's plain NoPE."""
    kw = dict(rope_mode="shared", rope_pairs=8, kv_ratio=0.5, method="activation")
    plain = _ppl(_convert(stories, tmp_path / "plain", **kw), windows)
    fit_dir = _convert(stories, tmp_path / "fit", nope_scaling="fit", **kw)
    fit = _ppl(fit_dir, windows)
    print(f"stories260K shared 8 components, 50% cache: plain NoPE {plain:.2f}, NoPE fit {fit:.2f}")
    assert fit < 0.9 * plain, (fit, plain)
    assert json.loads((fit_dir / "config.json").read_text())["latent_kv"]["method"]["params"]["nope_scaling"] == "fit"


def test_nope_scaling_refuses_what_it_cannot_scale(stories, tmp_path):
    from tests.helpers import make_hf_model

    with pytest.raises(ConversionError, match="partial or shared"):
        convert(stories, tmp_path / "x", ConvertOptions(rope_mode="full", kv_ratio=0.5, nope_scaling="fit",
                                                      calibration_text=CAL), progress=False)
    qwen3 = make_hf_model(tmp_path / "qwen3", "qwen3")
    with pytest.raises(ConversionError, match="q/k-norm"):
        convert(qwen3, tmp_path / "y", ConvertOptions(rope_mode="partial", rope_strategy="high", kv_ratio=0.5,
                                                    nope_scaling="fit"), progress=False,
                calibration_ids=torch.randint(3, 100, (2, 16)))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_nope_scaling_flag():
    import argparse

    from converters.cli import add_convert_args
    from converters.options import from_args as options_from_args

    parser = argparse.ArgumentParser()
    add_convert_args(parser)
    args = parser.parse_args(["--rope-mode", "shared", "--kv-ratio", "0.5", "--nope-scaling", "fit"])
    assert options_from_args(args).nope_scaling == "fit"
    assert options_from_args(parser.parse_args(["--rank", "8"])).nope_scaling == "none"


@pytest.mark.parametrize("objective", ["attention", "block"])
def test_refinement_lowers_perplexity_and_leaves_exact_layers_exact(stories, windows, tmp_path, objective):
    """Fitting the latent factors to the source attention's output (converters/math/refine.py), or with
    --refine-objective block to what the whole layer adds through the source's frozen MLP."""
    kw = dict(rope_mode="full", rank=16, method="activation")  # a 25% cache
    closed_form = _ppl(_convert(stories, tmp_path / "closed", **kw), windows)
    refined_dir = _convert(stories, tmp_path / "refined", refine_steps=60, refine_objective=objective, **kw)
    refined = _ppl(refined_dir, windows)
    print(f"stories260K full RoPE, 25% cache: closed form {closed_form:.2f}, refined ({objective}) {refined:.2f}")
    assert refined < 0.85 * closed_form, (refined, closed_form)
    assert json.loads((refined_dir / "config.json").read_text())["latent_kv"]["method"]["params"]["refine_steps"] == 60
    exact = _convert(stories, tmp_path / "exact", rope_mode="full", kv_ratio=1.0, method="activation", refine_steps=20,
                     refine_objective=objective)
    torch.testing.assert_close(load_latent(exact)(IDS).logits, load_hf(stories)(IDS).logits, atol=1e-4, rtol=0)


def test_model_target_refinement_beats_the_layer_target(stories, windows, tmp_path):
    """--refine-target model (the default): each layer is fitted to the source model's own residual
    stream, fed the converted one, so it also makes up for the layers before it. (Exactness at full
    rank with the default refinement: the test above.)"""
    kw = dict(rope_mode="full", rank=16, method="activation", refine_steps=60)  # a 25% cache
    layer = _ppl(_convert(stories, tmp_path / "layer", refine_target="layer", **kw), windows)
    model = _ppl(_convert(stories, tmp_path / "model", refine_target="model", **kw), windows)
    print(f"stories260K full RoPE, 25% cache, refined to the layer's output {layer:.3f}, to the model's stream {model:.3f}")
    assert model < layer, (layer, model)


def test_residual_weight_scales_the_stream_error_in_the_target(stories):
    """--refine-residual-weight alpha: the model target is o_src(h_src) + alpha (h_src - h). A full-rank
    closed form is the source attention (o = o_src), so the error it starts from (steps=0) fed a drifted
    stream h = h_src + d is ||o_src(h) - o_src(h_src) + alpha d||^2 / ||o_src(h_src) - alpha d||^2 (d's sign:
    h_src - h = -d)."""
    from converters import calibration as calib
    from converters.convert import _convert_attention, complete_biases, has_bias, latent_widths
    from converters.importers.hf import SourceModel

    source = SourceModel(stories)
    opts = ConvertOptions(rope_mode="full", kv_ratio=1.0, method="activation")
    h_src = calib.embed(source, torch.randint(0, source.dims.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0)))
    d = 0.1 * torch.randn(h_src.shape, generator=torch.Generator().manual_seed(1))
    layer, tensors = _convert_attention(0, latent_widths(opts, source.dims, source.qk_norm)[0], opts, source, h_src)
    tensors = complete_biases(layer, tensors, opts, source)

    def fit(hidden, **kw):  # no steps: the closed form's error and outputs
        return calib.refine_latent_layer(source, 0, hidden, layer, tensors, has_bias(opts, source), steps=0, lr=1e-3,
                                         batch=2, **kw)[1]

    o_src, o_drifted = fit(h_src).outputs, fit(h_src + d).outputs
    for alpha in (0.0, 0.5, 1.0):
        error = fit(h_src + d, reference=h_src, residual_weight=alpha).error_before
        expected = (o_drifted - o_src + alpha * d).pow(2).sum() / (o_src - alpha * d).pow(2).sum()
        assert error == pytest.approx(float(expected), rel=1e-4), alpha
    with pytest.raises(ValueError, match="--refine-target model"):
        ConvertOptions(refine_target="layer", refine_residual_weight=0.5).check()


def test_calibration_streams_are_those_the_recipe_reads():
    """The converted model's stream is carried beside the source's only when something reads it: the
    model-target refinement (the student's input) or --calibration-inputs converted."""
    h = torch.zeros(2, 4, 8)
    streams = lambda **kw: set(calibration_streams(ConvertOptions(**kw), h))  # noqa: E731
    assert streams() == {"original", "converted"}  # the default refinement targets the source model's stream
    assert streams(refine_target="layer") == {"original"}
    assert streams(refine_steps=0) == {"original"}
    assert streams(calibration_inputs="converted", refine_target="layer") == {"converted"}
    assert calibration_streams(ConvertOptions(), None) == {}


def test_kl_allocation_meets_the_budget_and_beats_uniform(stories, windows, tmp_path):
    """Widths from each layer's effect on the output: the same cache, a lower perplexity than uniform widths."""
    kw = dict(rope_mode="full", kv_ratio=0.375, method="activation", calibration_samples=8)
    out = _convert(stories, tmp_path / "kl", rank_allocation="kl", allocation_samples=4, **kw)
    layers = json.loads((out / "config.json").read_text())["latent_kv"]["layers"]
    cache = [layer["latent"]["v_rank"] if layer["kind"] == "latent" else 64 for layer in layers]  # 64: uncompressed
    assert sum(cache) == 5 * round(0.375 * 64) and len(set(cache)) > 1, cache
    uniform = _ppl(_convert(stories, tmp_path / "uniform", **kw), windows)
    allocated = _ppl(out, windows)
    print(f"stories260K full RoPE 37.5% cache: uniform widths {uniform:.3f}, kl allocation {allocated:.3f} ({cache})")
    assert allocated < uniform, (allocated, uniform)


def test_kl_pick_keeps_a_layer_whole_when_that_pays():
    from converters.allocation import pick_widths

    # two layers, uniform width 4 (+ 0 rope) of a source layer of 8 values: layer 0 is very sensitive
    kl = {0: {2: 9.0, 4: 5.0, 6: 3.0}, 1: {2: 0.1, 4: 0.05, 6: 0.01}}
    assert pick_widths(kl, {0: 4, 1: 4}, rope=0, whole=8) == [6, 2]
    kl[0] = {2: 9.0, 4: 5.0, 6: 4.0}  # keeping layer 0 (8 values, KL 0) forces layer 1 to width 0: not measured
    assert pick_widths(kl, {0: 4, 1: 4}, rope=0, whole=8) == [6, 2]
    kl[1][2], kl[1][0] = 0.1, 0.2  # now width 0 of layer 1 is a (measured) choice: keep layer 0
    assert pick_widths(kl, {0: 4, 1: 4}, rope=0, whole=8) == [None, 0]
    # rope values count in the cost: 4 + 2 rope each; keeping costs 8 = width 6 + 2
    assert pick_widths({0: {2: 9.0, 4: 5.0}, 1: {2: 0.1, 4: 0.05}}, {0: 4, 1: 4}, rope=2, whole=8) == [None, 2]


@pytest.mark.parametrize("recipe", [dict(), dict(refine_target="layer", calibration_inputs="converted"),
                                    dict(refine_target="layer"), dict(refine_objective="block")])
def test_streams_from_the_refinement_equal_the_layer_run_again(stories, recipe):
    """A refined layer's streams go on from the outputs the fit computed (the MLP alone runs after the
    attention's): bit for bit what running the whole converted (or source) layer again gives; the block
    objective's streams are h + (layer(h) - h), equal to rounding."""
    from converters import calibration as calib
    from converters.convert import _propagate, convert_layer, latent_widths
    from converters.importers.hf import SourceModel

    source = SourceModel(stories)
    opts = ConvertOptions(rope_mode="full", kv_ratio=0.25, method="activation", refine_steps=5, **recipe)
    h = calib.embed(source, torch.randint(0, source.dims.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0)))
    streams = {kind: h + 0.1 * torch.randn(h.shape, generator=torch.Generator().manual_seed(1)) * (kind == "converted")
               for kind in calibration_streams(opts, h)}  # after layer 0 the converted stream has drifted
    layer, tensors, after_layer = convert_layer(1, latent_widths(opts, source.dims, source.qk_norm)[1], opts, source, streams)
    assert set(after_layer) >= set(streams)
    exact = dict(rtol=0, atol=0) if opts.refine_objective == "attention" else {}
    for kind, hidden in streams.items():
        torch.testing.assert_close(after_layer[kind],
                                   _propagate(1, hidden, layer, tensors, opts, source, converted=kind == "converted"), **exact)
