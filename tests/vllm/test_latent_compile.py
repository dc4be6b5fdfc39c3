"""Latent models with vLLM's compilation on: the model class is ``@support_torch_compile`` and a
latent layer's cache write + attention is one custom op (``vllm::latentkv_attention``) that
torch.compile treats as opaque and piecewise compilation splits at, as vLLM's own attention.

On the CPU platform ``LATENTKV_CPU_COMPILE=1`` keeps vLLM's CPU compilation (Dynamo traced once,
Inductor) instead of eager mode. Greedy tokens and prompt logprobs must equal the reference
model's, exactly as in eager mode, for every layer kind (our backend's partial, full and shared
layers, vLLM's MLA layer, vLLM's Attention for kept layers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 8
CASES = ["gqa_partial", "mha_full", "gqa_shared", "deepseek_shaped"]


def _child(case: str, work: str) -> None:
    """In a fresh process with LATENTKV_CPU_COMPILE=1 (the platform reads it at engine start)."""
    from test_latent_helpers import (RANDOM_VOCAB, check_greedy_matches_reference, check_prompt_logprobs_match_reference,
                                     chunked_engine, convert_random_case, random_prompts, reference_model)
    from vllm.config import CompilationMode

    latent = convert_random_case(Path(work), case)
    engine = chunked_engine(latent)
    try:
        config = engine.llm.llm_engine.vllm_config.compilation_config
        assert config.mode != CompilationMode.NONE, config.mode
        assert "vllm::latentkv_attention" in config.splitting_ops or config.mode == CompilationMode.DYNAMO_TRACE_ONCE
        compiled = engine.llm.apply_model(lambda model: type(model.model).__name__ + ":" + str(
            getattr(model.model, "do_not_compile", None)))[0]
        assert compiled.endswith("False"), compiled  # @support_torch_compile is active
        ref = reference_model(latent)
        prompts = random_prompts(RANDOM_VOCAB)
        check_greedy_matches_reference(engine, ref, prompts, N_NEW)
        check_prompt_logprobs_match_reference(engine, ref, prompts[-1])
    finally:
        engine.close()


@pytest.mark.parametrize("case", CASES)
def test_compiled_model_equals_reference(case, tmp_path):
    env = {**os.environ, "LATENTKV_CPU_COMPILE": "1", "LATENTKV_CPU_PLATFORM": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    proc = subprocess.run([sys.executable, __file__, case, str(tmp_path)], env=env, cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
    _child(sys.argv[1], sys.argv[2])
