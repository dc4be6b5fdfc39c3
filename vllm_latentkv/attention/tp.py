"""Tensor-parallel head split shared by the attention layers (``layer.py``, ``head.py``, ``mla.py``)."""

from __future__ import annotations

from vllm_latentkv._vllm import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size


def tp_split(where: str, num_heads: int, num_kv_heads: int | None = None) -> tuple[int, int]:
    """(tensor-parallel size, this rank), after checking that the query heads (and, when given,
    the KV heads) divide evenly over the tensor-parallel size; ``where`` names the layer in errors."""
    tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    if num_kv_heads is None:
        if num_heads % tp:
            raise ValueError(f"{where}: {num_heads} query heads cannot be split over tensor-parallel size {tp}")
    elif num_heads % tp or num_kv_heads % tp:
        raise ValueError(
            f"{where}: {num_heads} query heads / {num_kv_heads} KV heads cannot be split over tensor-parallel size {tp}"
        )
    return tp, rank
