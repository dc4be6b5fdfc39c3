"""Pure-PyTorch stand-ins for the vLLM CPU-build kernels the engine calls.

The PyPI wheel of vLLM 0.32.0 is a CUDA build: its ``_C`` library holds no CPU
kernels (and cannot even be loaded without ``libcuda``). On a CPU platform the
engine still calls these:

=====================================  =============================================
op / kernel                            caller (vLLM 0.32.0)
=====================================  =============================================
``_C::init_cpu_memory_env``            ``v1/worker/cpu_worker.py`` (NUMA binding)
``_C::compute_slot_mapping_kernel_impl``  ``v1/attention/backends/cpu_attn.py``,
                                       ``utils/cpu_triton_utils.py``
``_C::greedy_argmax``                  ``v1/sample/sampler.py`` (temperature 0)
``_C::fused_gumbel_argmax``            ``v1/sample/ops/topk_topp_sampler.py``
``_C::convert_weight_packed``,         ``model_executor/layers/utils.py``
``_C::weight_packed_linear``           (``dispatch_cpu_unquantized_gemm``: bf16/fp16
                                       linear layers, on hosts with AMX only)
``_C::mla_decode_kvcache``             ``v1/attention/backends/mla/cpu_mla.py``
                                       (decode of vLLM's own MLA layer, CPU_MLA)
``ComputeSlotMappingKernel.kernel``    ``v1/worker/block_table.py`` (Triton kernel,
                                       replaced through ``register_kernels``)
=====================================  =============================================

The schemas match the C++ definitions in vLLM's ``csrc/cpu/torch_bindings.cpp``.
Nothing here imports vLLM, so the functions are unit-testable on their own.
"""

import torch

# Kept alive for the life of the process: a Library that is garbage collected
# takes its registrations with it.
_LIB: torch.library.Library | None = None

_SCHEMAS = {
    "init_cpu_memory_env": "init_cpu_memory_env(int[] node_ids) -> ()",
    "compute_slot_mapping_kernel_impl": (
        "compute_slot_mapping_kernel_impl(Tensor query_start_loc, Tensor positions, "
        "Tensor block_table, Tensor(a!) slot_mapping, SymInt block_size) -> ()"
    ),
    "greedy_argmax": "greedy_argmax(Tensor logits) -> Tensor",
    "fused_gumbel_argmax": "fused_gumbel_argmax(Tensor logits, Tensor seeds) -> Tensor",
    "convert_weight_packed": "convert_weight_packed(Tensor weight) -> Tensor",
    # vLLM 0.32 calls it with the output first (vllm/_custom_ops.py).
    "weight_packed_linear": (
        "weight_packed_linear(Tensor(a!) out, Tensor mat1, Tensor mat2, Tensor? bias, "
        "bool is_vnni) -> ()"
    ),
    "mla_decode_kvcache": (
        "mla_decode_kvcache(Tensor(a!) out, Tensor query, Tensor kv_cache, float scale, "
        "Tensor block_tables, Tensor seq_lens) -> ()"
    ),
}


def init_cpu_memory_env(node_ids: list[int]) -> None:
    # The C++ op binds the process's memory to NUMA nodes. A reference platform
    # has nothing to gain from that, and 2-core CI machines have one node.
    del node_ids


def slot_mapping(
    query_start_loc: torch.Tensor,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Cache slot of every scheduled token: ``block_table[req, pos // bs] * bs + pos % bs``.

    query_start_loc: [num_reqs + 1]; positions: [num_tokens];
    block_table: [>= num_reqs, max_blocks_per_req]. Returns int64 [num_tokens].
    """
    qsl = query_start_loc.to(torch.int64)
    num_tokens = int(qsl[-1])
    counts = qsl[1:] - qsl[:-1]
    req_idx = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    pos = positions[:num_tokens].to(torch.int64)
    blocks = block_table[req_idx, pos // block_size].to(torch.int64)
    return blocks * block_size + pos % block_size


def compute_slot_mapping_kernel_impl(
    query_start_loc: torch.Tensor,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping_out: torch.Tensor,
    block_size: int,
) -> None:
    slots = slot_mapping(query_start_loc, positions, block_table, block_size)
    slot_mapping_out[: slots.numel()] = slots


def compute_slot_mapping_kernel(
    num_tokens,
    max_num_tokens,
    query_start_loc_ptr,
    positions_ptr,
    block_table_ptr,
    block_table_stride,
    slot_mapping_ptr,
    KV_CACHE_BLOCK_SIZE,
    TOTAL_CP_WORLD_SIZE,
    TOTAL_CP_RANK,
    CP_KV_CACHE_INTERLEAVE_SIZE,
    PAD_ID,
    BLOCK_SIZE,
) -> None:
    """Replacement for ``block_table.ComputeSlotMappingKernel.kernel``.

    The parameter names are the Triton kernel's own: vLLM's ``KernelOverride``
    forwards launch arguments by name when the names match (and by the kernel's
    positional order otherwise). vLLM 0.32's own CPU fallback for this kernel takes
    another order and fails, hence this one.
    """
    if TOTAL_CP_WORLD_SIZE != 1:
        raise NotImplementedError(
            "context parallelism is not supported by the latentkv CPU platform"
        )
    del block_table_stride, TOTAL_CP_RANK, CP_KV_CACHE_INTERLEAVE_SIZE, BLOCK_SIZE
    slots = slot_mapping(
        query_start_loc_ptr, positions_ptr[:num_tokens], block_table_ptr,
        KV_CACHE_BLOCK_SIZE,
    )
    slot_mapping_ptr[:num_tokens] = slots
    # The Triton kernel pads the tail for CUDA-graph replay; keep that contract.
    slot_mapping_ptr[num_tokens:max_num_tokens] = PAD_ID


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    # logits: [num_reqs, vocab] -> int64 [num_reqs]
    return logits.argmax(dim=-1).view(-1)


def fused_gumbel_argmax(logits: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from softmax(logits) with the Gumbel-max trick.

    argmax(logits + G), G = -log(E), E ~ Exp(1), is a draw from softmax(logits).
    Each row draws its noise from its own seed, as the C++ op does, so a request's
    samples do not depend on the other requests in the batch (the noise stream
    itself differs from the C++ SplitMix64 one).
    """
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    for row, seed in enumerate(seeds.tolist()):
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.empty(logits.shape[1], dtype=torch.float32).exponential_(
            generator=gen
        )
        out[row] = (logits[row].float() - noise.log()).argmax()
    return out


def convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    # The C++ op repacks [N, K] into AMX tiles; the "packed" format here is the
    # plain weight, which weight_packed_linear below expects.
    return weight.clone()


def weight_packed_linear(
    out: torch.Tensor,  # [M, N]
    mat1: torch.Tensor,  # [M, K]
    mat2: torch.Tensor,  # [N, K], from convert_weight_packed
    bias: torch.Tensor | None,  # [N]; vLLM casts it to float32 for this op
    is_vnni: bool,
) -> None:
    del is_vnni
    # out = mat1 @ mat2^T + bias, accumulated in float32 like the AMX kernel
    result = mat1.float() @ mat2.float().t()
    if bias is not None:
        result += bias.float()
    out.copy_(result)


def mla_decode_kvcache(
    out: torch.Tensor,  # [B, H, W]
    query: torch.Tensor,  # [B, H, W + R]: absorbed nope query | rope query
    kv_cache: torch.Tensor,  # [num_blocks, block_size, W + R]: latent | shared rope key
    scale: float,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
) -> None:
    """MQA of each decode query over its request's cache rows; ``out`` is the attention-weighted
    sum of the rows' first W values (the latent), as the C++ kernel writes it."""
    block_size, width = kv_cache.shape[1], out.shape[-1]
    rows_of = kv_cache.view(-1, kv_cache.shape[-1])
    for b, seq_len in enumerate(seq_lens.tolist()):
        pos = torch.arange(seq_len)
        rows = rows_of[block_tables[b, pos // block_size].long() * block_size + pos % block_size].float()
        probs = torch.softmax(query[b].float() @ rows.T * scale, dim=-1)  # [H, seq_len]
        out[b] = (probs @ rows[:, :width]).to(out.dtype)


_IMPLS = {
    "init_cpu_memory_env": init_cpu_memory_env,
    "compute_slot_mapping_kernel_impl": compute_slot_mapping_kernel_impl,
    "greedy_argmax": greedy_argmax,
    "fused_gumbel_argmax": fused_gumbel_argmax,
    "convert_weight_packed": convert_weight_packed,
    "weight_packed_linear": weight_packed_linear,
    "mla_decode_kvcache": mla_decode_kvcache,
}


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops._C, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_cpu_ops() -> list[str]:
    """Define the missing ``torch.ops._C`` CPU ops; return the names defined now.

    Idempotent, and leaves ops alone that a real vLLM CPU build already provides.
    """
    global _LIB
    missing = [name for name in _SCHEMAS if not _has_op(name)]
    if not missing:
        return []
    if _LIB is None:
        _LIB = torch.library.Library("_C", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])
        _LIB.impl(name, _IMPLS[name], "CompositeExplicitAutograd")
    return missing
