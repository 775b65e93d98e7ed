"""Attention over packed rows without torchtune's graph breaks.

torchtune 0.6.1 builds each packed batch's block mask in its collate function, eagerly (a mask function
evaluated at every one of the batch's 4 x 2048 x 2048 positions, after a blocking copy of the document ids to
the GPU), and calls flex attention from behind `torch.compiler.disable`, which splits every compiled layer's
graph in two. Here the collate function hands on each row's document ids, the step builds the mask on the
device with a compiled `create_block_mask`, and compiled layers trace flex attention into their graph.
"""

from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torchtune.modules.attention import MultiHeadAttention

# Compiled at its first call, and again only for another batch shape (the last, smaller validation batch).
_create_block_mask = torch.compile(create_block_mask)


def collate_packed(rows: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """torchtune's `padded_collate_packed`, with each row's document ids (`seq_lens` as [0, 0, 0, 1, 1, ...],
    the padding one more document) where it puts the mask: `block_causal_mask` builds that on the device."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in ("tokens", "labels", "input_pos")}
    documents = [torch.repeat_interleave(torch.arange(len(row["seq_lens"])), row["seq_lens"]) for row in rows]
    batch["document_ids"] = torch.stack(documents)
    return batch


def block_causal_mask(document_ids: torch.Tensor, flex: Optional[bool] = None) -> Union[BlockMask, torch.Tensor]:
    """Each position attends to the earlier positions of its own sample: a flex attention `BlockMask` on CUDA,
    a dense [batch, len, len] boolean mask elsewhere (flex attention has no backward pass on CPU)."""
    rows, length = document_ids.shape
    if not (document_ids.is_cuda if flex is None else flex):
        causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
        return causal & (document_ids[:, :, None] == document_ids[:, None, :])

    def same_sample_causal(b, h, q, kv):
        return (q >= kv) & (document_ids[b, q] == document_ids[b, kv])

    return _create_block_mask(same_sample_causal, rows, None, length, length, device=document_ids.device)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float, is_causal: bool
) -> torch.Tensor:
    """torchtune's `_attention_call` less the `torch.compiler.disable` around flex attention."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    mask = None if mask is None else mask[:, None, :, :]  # one mask for every head
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def trace_flex_attention(model: torch.nn.Module) -> None:
    """Before `torch.compile`: every attention layer calls `attention`. Uncompiled, flex attention would
    materialize every score, so eager models keep torchtune's call, which runs a compiled flex attention."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            if module.attn_dropout:  # flex attention has no dropout (torchtune's call refuses it too)
                raise ValueError(f"attention dropout {module.attn_dropout}: flex attention has none; set it to 0")
            module._attention_call = attention  # the attribute torchtune's layers call; no public hook
