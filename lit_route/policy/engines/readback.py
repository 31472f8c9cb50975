"""Whether an engine holds what a weight push brought, read back from the engine itself.

After a push, a few columns of every engine parameter the push filled are read out of the engine and compared,
exactly, with the same columns of the tensors pushed. A parameter the engine did not take keeps its previous
values, which differ from the pushed ones wherever the push changes anything; where they do not differ the
engine already samples from the pushed weights.

vLLM's CPU backend packs a linear layer's weight into its kernel and drops the parameter, so linear layers (and
embeddings, whose kernel computes the logits) are read through their own kernel: the unit rows ``e_j`` give
``e_j @ W.T = W[:, j]``, exactly (one product by 1, the others by 0, in any summation order), whatever layout the
kernel keeps. Every other parameter (norms, biases) is read as it is.
"""

from __future__ import annotations

import torch

from lit_route.policy.engines.weights import engine_name

COLUMNS = 4  # sampled per 2-D weight and sync: a weight the engine did not take differs in every column


def sample_columns(width: int, seed: int) -> list[int]:
    """``COLUMNS`` distinct column indices below ``width`` drawn from ``seed`` (other columns every sync)."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(width, generator=generator)[:COLUMNS].tolist())


@torch.no_grad()
def engine_readback(requests: dict[str, int | None], seed: int, model) -> dict[str, torch.Tensor]:
    """(Runs inside vLLM's worker.) The sampled columns of the engine parameters ``requests`` names.

    Args:
        requests: Engine parameter name -> the width of its input dimension (``None``: a 1-D parameter, read
            whole).
        seed: Picks the columns (:func:`sample_columns`).
        model: The engine's model.

    Returns:
        Name -> ``(rows, COLUMNS)`` columns ``W[:, j]`` (rows: the parameter's output dimension, vocabulary
        padding included), or the whole 1-D parameter; on the CPU.
    """
    from vllm.lora.layers import BaseLayerWithLoRA
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a GPU's float32 kernels may otherwise round through TF32
    try:
        out = {}
        for name, width in requests.items():
            path, _, param_name = name.rpartition(".")
            module = model.get_submodule(path)
            if isinstance(module, BaseLayerWithLoRA):
                module = module.base_layer
            param = getattr(module, param_name)
            if width is None:
                out[name] = param.detach().flatten().cpu().clone()
                continue
            cols = sample_columns(width, seed)
            if param_name == "weight" and isinstance(module, LinearBase | VocabParallelEmbedding):
                probe = torch.zeros(len(cols), width, dtype=param.dtype, device=param.device)
                probe[torch.arange(len(cols)), cols] = 1
                out[name] = module.quant_method.apply(module, probe).T.cpu()
            else:
                out[name] = param.detach()[:, cols].cpu()
        return out
    finally:
        torch.set_float32_matmul_precision(precision)


def expected_readback(weights: list[tuple[str, torch.Tensor]], fused: dict[str, list[str]], engine_params: set[str],
                      transposed: set[str], seed: int) -> dict[str, tuple[int | None, torch.Tensor]]:
    """What :func:`engine_readback` must return for each engine parameter ``weights`` fill whole.

    A fused parameter stacks its members' rows in ``fused`` order (``qkv_proj``: ``q_proj``, ``k_proj``,
    ``v_proj``); one the push brings in part is left out (:func:`~.weights.sync_shortfall` names it).

    Args:
        weights: The pushed ``(checkpoint name, tensor)`` pairs.
        fused: The engine's fused layers (see :func:`~.weights.merged_weights`).
        engine_params: The engine model's parameter names (fused names).
        transposed: Checkpoint names stored ``(in, out)`` (GPT-2's ``Conv1D``; :func:`~.weights.conv1d_names`).
        seed: Picks the columns (:func:`sample_columns`).

    Returns:
        Engine name -> ``(width, expected)``: the width of its input dimension (``None`` for 1-D) and the
        ``(rows, COLUMNS)`` columns (1-D: the whole parameter) on the CPU.
    """
    pushed = dict(weights)
    out = {}
    for target in dict.fromkeys(engine_name(n, fused) for n in pushed):
        if target not in engine_params:
            continue
        path, _, param = target.rpartition(".")
        parent, _, leaf = path.rpartition(".")
        prefix = f"{parent}." if parent else ""
        names = [f"{prefix}{m}.{param}" for m in fused[leaf]] if leaf in fused else [target]
        if not all(n in pushed for n in names):
            continue
        tensors = [pushed[n].detach().T if n in transposed else pushed[n].detach() for n in names]
        if tensors[0].dim() == 1:
            out[target] = (None, torch.cat(tensors).cpu())
        elif tensors[0].dim() == 2:
            width = tensors[0].shape[1]
            cols = sample_columns(width, seed)
            out[target] = (width, torch.cat([t[:, cols] for t in tensors]).cpu())
    return out


def readback_mismatches(expected: dict[str, tuple[int | None, torch.Tensor]],
                        read: dict[str, torch.Tensor]) -> set[str]:
    """The engine parameters whose read-back differs from what was pushed (in the engine's dtype: its loader
    rounds a pushed float32 tensor to it the same way).

    Args:
        expected: :func:`expected_readback`.
        read: :func:`engine_readback` of the same requests and seed.
    """
    out = set()
    for name, (_, want) in expected.items():
        got = read[name]
        want = want.to(got.dtype)
        rows = want.shape[0]  # the engine may pad a vocabulary beyond the checkpoint's rows
        if got.shape[0] < rows or got.shape[1:] != want.shape[1:] or not torch.equal(got[:rows], want):
            out.add(name)
    return out
