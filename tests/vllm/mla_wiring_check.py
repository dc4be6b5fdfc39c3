"""Run as a script (own process: it initialises vLLM's distributed state) by test_mla_mapping.py.

Builds :class:`vllm_latentkv.attention.mla.LatentMLAAttention` for layer 0 of the converted
checkpoint ``argv[1]`` with vLLM's ``MultiHeadLatentAttentionWrapper`` replaced by a recorder
(vLLM's MLA backends need CUDA), loads the checkpoint's attention tensors through
``LatentKVForCausalLM.load_weights``' parameter loaders, and checks (1) every parameter is
loaded by name or derived, (2) ``kv_b_proj`` equals ``mla_mapping.mla_weights``, (3) the modules,
dims and scale handed to the wrapper, run through the transcription of vLLM's MLA math in
``test_mla_mapping``, give the reference layer's output. Prints OK.
"""

import os
import sys

os.environ.setdefault("LATENTKV_CPU_PLATFORM", "1")

from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def main(path: str, port: str) -> None:
    import vllm.model_executor.layers.mla as vllm_mla
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention.mla_attention import (
        MLACommonBackend,
        MLACommonMetadata,
        MLACommonMetadataBuilder,
    )
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    from latentkv import format as fmt
    from test_mla_mapping import vllm_mla_layer
    from tests.helpers import load_latent
    from vllm_latentkv.attention import mla as ours
    from vllm_latentkv.mla_mapping import mla_weights

    recorded = {}

    class Recorder(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            recorded.update(kw)
            self.mla_attn = SimpleNamespace(attn_backend=MLACommonBackend)

    vllm_mla.MultiHeadLatentAttentionWrapper = Recorder
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        ensure_model_parallel_initialized(1, 1)
        spec, dims = fmt.load_spec(fmt.read_config(path))
        layer = spec.layers[0]
        vc = VllmConfig()
        attn = ours.LatentMLAAttention(vc, spec, dims, 0, None, prefix="model.layers.0.self_attn")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    p = "model.layers.0.self_attn."
    params = dict(attn.named_parameters())
    loaded = set()
    for name, t in tensors.items():
        if name.startswith(p):
            local = name[len(p):]
            param = params[local]
            getattr(param, "weight_loader", None)(param, t) if hasattr(param, "weight_loader") else param.data.copy_(t)
            loaded.add(local)
    loaded |= set(attn.derived_parameters)
    assert loaded == set(params), (sorted(loaded), sorted(params))
    ckpt = {n: tensors[p + n + ".weight"] for n in ("q_proj", "kv_a_proj", "k_b_proj", "v_b_proj", "o_proj")}
    want = mla_weights(ckpt, layer, dims)
    torch.testing.assert_close(attn.kv_b_proj.weight.data, want["kv_b_proj"].to(attn.kv_b_proj.weight.dtype))

    m = recorded["mla_modules"]
    assert isinstance(m.kv_a_layernorm, torch.nn.Identity)  # our latent has no norm
    assert recorded["q_lora_rank"] is None and m.fused_qkv_a_proj is None and not m.is_sparse
    w = {"q_proj": m.q_proj.weight.double(), "kv_a_proj_with_mqa": m.kv_a_proj_with_mqa.weight.double(),
         "kv_b_proj": m.kv_b_proj.weight.double(), "o_proj": m.o_proj.weight.double()}
    kw = dict(H=recorded["num_heads"], d_nope=recorded["qk_nope_head_dim"], d_rope=recorded["qk_rope_head_dim"],
              d_v=recorded["v_head_dim"], W=recorded["kv_lora_rank"], scale=recorded["scale"])
    ref_model = load_latent(path, dtype=torch.float64)
    ref_attn = ref_model.model.layers[0].self_attn
    x = torch.randn(10, dims.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(10)
    with torch.no_grad():
        ref = ref_attn(x[None], pos[None], None, None, "expand")[0]
        for decode in (False, True):
            got = vllm_mla_layer(w, m.rotary_emb, x, pos, decode_last=decode, **kw)
            torch.testing.assert_close(got, ref[-1:] if decode else ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # the backend swap: same backend, builder making metadata without the 320/512/576 head_dim check
    relaxed = attn.mla.mla_attn.attn_backend
    assert issubclass(relaxed, MLACommonBackend) and relaxed.get_name() == MLACommonBackend.get_name()
    builder = relaxed.get_builder_cls()
    assert issubclass(builder, MLACommonMetadataBuilder)
    meta_kw = dict(num_reqs=1, max_query_len=1, max_seq_len=1, num_actual_tokens=1, query_start_loc=None,
                   slot_mapping=None, num_decodes=1, num_decode_tokens=1, num_prefills=0, head_dim=dims.head_dim)
    try:
        MLACommonMetadata(**meta_kw)
        raise AssertionError("vLLM's MLACommonMetadata no longer rejects head_dim %d" % dims.head_dim)
    except ValueError:
        pass
    relaxed_meta = ours._relaxed_metadata(MLACommonMetadata)
    assert relaxed_meta(**meta_kw).head_dim == dims.head_dim
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
