"""latentkv heal: distillation of a converted stories260K towards its source (real pretrained weights,
real TinyStories text), resumption after a kill, and bad input refused before any training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converters.cli import DATA, main
from converters.convert import ConvertOptions, convert
from converters.heal import HealOptions, heal
from converters.importers.llama2c import import_llama2c, packaged_stories260k
from tests.helpers import PLAIN_SVD, load_latent

TRAIN = str(DATA / "text" / "tinystories_a.txt")
HELD_OUT = str(DATA / "text" / "tinystories_sample.txt")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(source, converted at a 25% cache with plain SVD: a large gap for the heal to close)."""
    work = tmp_path_factory.mktemp("heal")
    src = import_llama2c(*packaged_stories260k(), work / "src")
    conv = work / "conv"
    convert(src, conv, ConvertOptions(kv_ratio=0.25, **PLAIN_SVD), progress=False)
    return src, conv


def _opts(src, **kw) -> HealOptions:
    base = dict(teacher=str(src), text=TRAIN, eval_text=HELD_OUT, eval_windows=4, eval_seq_len=256, seq_len=128, batch_size=8, lr=3e-3,
                eval_every=10, seed=0)
    return HealOptions(**{**base, **kw})


def test_heal_lowers_held_out_perplexity(pair, tmp_path, one_torch_thread):
    src, conv = pair
    out = tmp_path / "healed"
    report = heal(conv, out, _opts(src, steps=30))
    first, last = report["history"][0], report["history"][-1]
    print(f"stories260K 25% cache: held-out perplexity {first['perplexity']:.3f} -> {last['perplexity']:.3f} "
          f"after {last['tokens']} tokens")
    assert first["step"] == 0 and last["step"] == 30 and last["tokens"] == 30 * 8 * 128
    assert last["perplexity"] < 0.6 * first["perplexity"]
    # the output is a latent checkpoint with the same ranks, only the latent projections changed
    before, after = load_file(conv / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.split(".")[-2] in ("kv_a_proj", "k_b_proj", "v_b_proj") for n in changed), changed
    config = json.loads((out / "config.json").read_text())
    assert config["latent_kv"]["layers"] == json.loads((conv / "config.json").read_text())["latent_kv"]["layers"]
    assert config["latent_kv"]["method"]["params"]["heal"]["steps"] == 30
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    healed = load_latent(out)  # the reference model reads it (and validates it against its config first)
    assert healed(torch.tensor([[1, 403, 407]])).logits.isfinite().all()


def _heal_cli(conv, src, out, *extra):
    return [sys.executable, "-m", "converters", "heal", str(conv), str(out), "--teacher", str(src), "--text", TRAIN,
            "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3", "--steps", "40", "--save-every", "4",
            "--eval-every", "100", *extra]


def test_killed_heal_resumes_to_the_same_weights(pair, tmp_path):
    src, conv = pair
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(REPO)}
    whole = tmp_path / "whole"
    subprocess.run(_heal_cli(conv, src, whole), check=True, env=env, capture_output=True, cwd=REPO, timeout=600)

    out = tmp_path / "resumed"
    work = tmp_path / "resumed.checkpoints"
    proc = subprocess.Popen(_heal_cli(conv, src, out), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (work / "checkpoint-8" / "trainer_state.json").is_file() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not out.exists()  # nothing half-written
    step = max(int(p.name.split("-")[1]) for p in work.glob("checkpoint-*"))
    assert step < 40

    again = subprocess.run(_heal_cli(conv, src, out, "--resume"), env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {work / f'checkpoint-{step}'}" in again.stderr, again.stderr[-3000:]
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bad_input_fails_before_training(pair, tmp_path, capsys):
    src, conv = pair
    out = tmp_path / "out"
    base = ["heal", str(conv), str(out), "--teacher", str(src), "--text", TRAIN, "--steps", "1"]

    def fails(argv, *words):
        assert main(argv) == 2
        err = capsys.readouterr().err
        for w in words:
            assert w in err, err
        assert not out.exists() and not (tmp_path / "out.checkpoints").exists()

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    fails(base[:5] + ["--text", str(empty), "--steps", "1"], "empty")
    fails(base[:3] + ["--teacher", str(conv), "--text", TRAIN], "latentkv checkpoint")
    other = tmp_path / "other"  # same architecture, a different tokenizer
    shutil.copytree(src, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]  # two ordinary tokens trade ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    fails(base[:3] + ["--teacher", str(other), "--text", TRAIN], "tokenizers differ")
    fails(base + ["--kl-weight", "0"], "nothing to train")
