"""The command line on the real stories260K model, and bad input that must fail cleanly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.cli import main
from tests.helpers import load_hf, load_latent


# These tests were written for the papers' defaults (MHA2MLA partial RoPE, plain SVD); the command
# line's defaults are now the calibrated recipe, so they ask for those explicitly (later flags win).
PAPER_FLAGS = ["--rope-mode", "partial", "--method", "svd", "--refine-steps", "0"]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    return import_llama2c(*packaged_stories260k(), tmp_path_factory.mktemp("s") / "stories260K")


def test_convert_real_model_all_pairs_is_exact(stories, tmp_path, capsys):
    out = tmp_path / "latent"
    assert main(["convert", str(stories), str(out), *PAPER_FLAGS, "--rope-strategy", "high", "--rope-pairs", "4", "--kv-ratio", "1.0"]) == 0
    ids = torch.tensor([[1, 403, 407, 261, 378, 11, 300, 284, 266, 352, 409, 282]])
    assert (load_latent(out)(ids).logits - load_hf(stories)(ids).logits).abs().max().item() < 1e-4
    assert (out / "tokenizer.json").is_file()
    assert "KV cache per token" in capsys.readouterr().out


def test_inspect_reports_ratio(stories, tmp_path, capsys):
    out = tmp_path / "latent"
    assert main(["convert", str(stories), str(out), *PAPER_FLAGS, "--rope-mode", "full", "--ranks", "32,32,16,16,8"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    # source: 2 x 4 KV heads x 8 dims = 64 values per layer; latent widths sum to 104 of 320
    assert "208 bytes vs 640" in text and "32.5%" in text


def test_eval_prints_perplexity(stories, capsys):
    from converters.cli import DATA

    assert main(["eval", str(stories), "--text", str(DATA / "text" / "tinystories_sample.txt"), "--seq-len", "512", "--windows", "document"]) == 0
    ppl = float(capsys.readouterr().out.split()[1])
    assert 3.3 < ppl < 3.8


def _fails(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    return err


def test_existing_output_is_refused_and_untouched(stories, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["convert", str(stories), str(out), *PAPER_FLAGS, "--rope-mode", "full", "--rank", "8"], capsys, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("args,words", [
    (["--rope-strategy", "high", "--rope-pairs", "5", "--rank", "8"], ["rope_pairs=5", "4 frequency pairs"]),
    (["--rope-mode", "full", "--rank", "999"], ["999", "largest useful rank"]),
    (["--rope-mode", "full", "--ranks", "8,8"], ["2 entries", "5 layers"]),
    (["--rope-strategy", "high", "--rope-pairs", "4", "--kv-ratio", "0.4"], ["rope keys alone"]),
    (["--kv-ratio", "1.5"], ["kv_ratio", "(0, 1]", "1.5"]),  # the bad ratio, not a calibration complaint
    (["--rope-mode", "shared", "--rope-pairs", "4", "--rank", "8", "--calibration-text", "missing.txt"], ["missing.txt"]),
    (["--rope-mode", "full", "--rank", "8", "--latent-groups", "3"], ["latent_groups=3"]),
])
def test_impossible_options_fail_before_writing(stories, tmp_path, capsys, args, words):
    out = tmp_path / "out"
    _fails(["convert", str(stories), str(out), *PAPER_FLAGS, *args], capsys, *words)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _copy(stories, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(stories, bad)
    return bad


def test_nan_weights_are_rejected(stories, tmp_path, capsys):
    bad = _copy(stories, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    _fails(["convert", str(bad), str(tmp_path / "out"), *PAPER_FLAGS, "--rope-mode", "full", "--rank", "8"], capsys,
           "model.layers.1.self_attn.k_proj.weight", "NaN")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_rejected(stories, tmp_path, capsys):
    bad = _copy(stories, tmp_path)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(["convert", str(bad), str(tmp_path / "out"), *PAPER_FLAGS, "--rope-mode", "full", "--rank", "8"], capsys, "truncated")


def test_unsupported_architecture_and_missing_files(stories, tmp_path, capsys):
    bad = _copy(stories, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    _fails(["convert", str(bad), str(tmp_path / "o"), *PAPER_FLAGS, "--rope-mode", "full", "--rank", "8"], capsys, "unsupported architecture")
    _fails(["convert", str(tmp_path / "nope"), str(tmp_path / "o"), *PAPER_FLAGS, "--rope-mode", "full", "--rank", "8"], capsys, "does not exist")


def test_broken_latent_checkpoints_fail_at_load_naming_the_problem(stories, tmp_path, capsys):
    out = tmp_path / "latent"
    assert main(["convert", str(stories), str(out), *PAPER_FLAGS, "--rope-mode", "full", "--rank", "16"]) == 0
    capsys.readouterr()
    from latentkv.checkpoint import validate_checkpoint
    from latentkv.format import FormatError

    config = json.loads((out / "config.json").read_text())
    broken = dict(config, latent_kv=dict(config["latent_kv"], format_version=99))
    (out / "config.json").write_text(json.dumps(broken))
    with pytest.raises(FormatError, match="format_version 99"):
        validate_checkpoint(out)
    broken = json.loads(json.dumps(config))
    broken["latent_kv"]["layers"][2]["latent"].update(k_rank=12, v_rank=12)
    (out / "config.json").write_text(json.dumps(broken))
    with pytest.raises(FormatError, match="model.layers.2.self_attn.*shape"):
        validate_checkpoint(out)
    broken["latent_kv"]["layers"][2]["latent"].update(k_rank=16, v_rank=16)
    broken["latent_kv"]["layers"][0]["colour"] = "blue"
    (out / "config.json").write_text(json.dumps(broken))
    with pytest.raises(FormatError, match="latent_kv.layers.0"):
        validate_checkpoint(out)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.3.self_attn.v_b_proj.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(FormatError, match="missing tensor.*model.layers.3.self_attn.v_b_proj.weight"):
        load_latent(out)
