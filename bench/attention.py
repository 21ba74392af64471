"""One attention path per batching, for every strategy: the harness's own SDPA entry in transformers'
AttentionInterface (`NAME`).

- Padded rows (right-padded, causal): no mask at all. Padding comes after every real token, so causal attention
  never lets a real token see it, and the loss mask already skips it; SDPA runs with is_causal (flash on a GPU).
- Packed rows: the collator gives the row's document boundaries once per micro-batch (bench/data.py Collate:
  `cu_seq_lens_q/k`, `max_length_q/k`, the names transformers' flash attention reads too), and attention is causal
  within each document, never materializing a T x T mask: on CUDA torch's `varlen_attn` (flash kernels, with
  autograd; torch/nn/attention/varlen.py), elsewhere one causal SDPA call per document.

Because the name is not in transformers' AttentionMaskInterface, transformers builds no mask for it at all
(masking_utils.py `_preprocess_mask_arguments`: "custom attention without equivalent mask creation"), and it
skips the packed-sequence detection that reads a device value on the host every forward. Pipeline stages call the
decoder layers with the same keyword arguments, and DeepSpeed's Ulysses wrapper passes them through to this core
attention after its all-to-all (deepspeed/runtime/sequence_parallel/ulysses_sp.py UlyssesSPAttentionHF.forward),
where every rank holds the whole gathered row, so the whole row's boundaries apply.

`--attn_mask dense` keeps transformers' own dense masks (a [B, 1, T, T] mask built from the padding mask or the
packed position ids) for comparison; `--attn_implementation eager` always builds one; flash_attention_2/3 read the
same boundaries from the keyword arguments.
"""
from __future__ import annotations

import torch

NAME = "bench_sdpa"  # the AttentionInterface key the model is built with (--attn_implementation sdpa)
# What the collator adds to a packed row: the offsets (flash attention's names) and the documents' lengths as host
# ints, so that the per-document path never reads the offsets back from a device
KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "document_lengths")


def register() -> None:
    """Make NAME an attention implementation transformers can build a model with (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, document_attention)


def model_implementation(attn_implementation: str, attn_mask: str) -> str:
    """The implementation name the model is built with: the harness's path for sdpa unless dense masks are asked."""
    if attn_implementation == "sdpa" and attn_mask == "auto":
        register()
        return NAME
    return attn_implementation


def varlen_runs(device_type: str, dtype, head_dim: int, capability: tuple | None = None) -> bool:
    """Whether torch's varlen_attn takes a packed row here: its flash kernel (aten._flash_attention_forward) needs
    CUDA, fp16 or bf16, an Ampere or newer GPU (capability: None when the planner cannot ask) and a head width
    that is a multiple of 8 up to 256. Elsewhere the per-document SDPA path runs."""
    import torch
    return (device_type == "cuda" and _varlen() is not None and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256 and (capability is None or tuple(capability) >= (8, 0)))


def describe(attn_implementation: str, attn_mask: str, batching: str, drops_mask: bool, device_type: str,
             varlen: bool = False) -> dict:
    """What summary.json records as `attention`: the implementation asked for, the kernel that runs and the mask
    kind. drops_mask: a strategy whose attention never gets the padding mask (pipeline stages, Ulysses); varlen:
    varlen_runs() for this run."""
    packed = batching == "packed"
    if attn_implementation == "eager":
        return {"implementation": "eager", "kernel": "eager (matmul + softmax)", "mask": "dense"}
    if attn_implementation.startswith("flash"):
        return {"implementation": attn_implementation, "kernel": f"flash-attn ({'varlen' if packed else 'causal'})",
                "mask": "documents" if packed else "causal"}
    if attn_mask == "dense":  # transformers' masks: the packed block-diagonal one, the padded rows' padding mask
        dense = packed or not drops_mask
        return {"implementation": "sdpa", "kernel": "sdpa (masked)" if dense else "sdpa (causal)",
                "mask": "dense" if dense else "causal"}
    if packed:
        return {"implementation": "sdpa", "kernel": "varlen_attn" if varlen else "sdpa per document",
                "mask": "documents"}
    return {"implementation": "sdpa", "kernel": "sdpa (causal)", "mask": "causal"}


def _varlen():
    """torch's variable-length flash attention, where this torch has it (CUDA builds of torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       cu_seq_lens_q=None, max_length_q=None, document_lengths=None, **kwargs):
    """transformers' attention signature: query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None).
    Causal within each document of cu_seq_lens_q (offsets into the B x T tokens, flattened), causal over the row
    without them."""
    for unsupported in ("sliding_window", "softcap"):  # what transformers' own sdpa path applies or refuses
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"the harness's attention has no {unsupported}; run this model with "
                             "--attn_mask dense (transformers' sdpa)")
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    b, heads, t, d = query.shape
    gqa = key.shape[1] != heads
    if dropout:
        raise ValueError("document attention runs without attention dropout (the LLaMA/Mixtral configs have none)")
    capability = None
    if query.device.type == "cuda":
        capability = torch.cuda.get_device_capability(query.device)
    if varlen_runs(query.device.type, query.dtype, d, capability):
        varlen = _varlen()
        # flash's layout, [tokens, heads, D]; max_length_q: the longest document, a host int from the collator,
        # bounded by the row's width where a caller (a pipeline stage) has only the tensor
        q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
        longest = int(max_length_q) if max_length_q is not None else b * t
        out = varlen(q, k, v, cu_seq_lens_q, cu_seq_lens_q, longest, longest, scale=scaling,
                     window_size=(-1, 0), enable_gqa=gqa)
        return out.reshape(b, t, heads, d), None
    if b > 1:  # rows side by side, as the offsets count them (the harness packs one row per micro-batch)
        query, key, value = (x.transpose(0, 1).reshape(1, x.shape[1], b * t, d) for x in (query, key, value))
    # Slices of the row along the sequence, views of q, k and v: SDPA saves them, not copies. The lengths come
    # from the collator as host ints; only a caller without them (a pipeline stage, which passes tensors alone)
    # reads the offsets, free on the CPU, a device read elsewhere.
    if document_lengths is not None:
        sizes = list(document_lengths)
    else:
        bounds = cu_seq_lens_q.tolist()
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    parts = [torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling,
                                                              enable_gqa=gqa)
             for qs, ks, vs in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))]
    out = torch.cat(parts, 2)  # [1, heads, b * t, D]
    if b > 1:
        out = out.reshape(heads, b, t, d).transpose(0, 1)
    return out.transpose(1, 2), None


def offsets(lengths: list[int], width: int) -> tuple[torch.Tensor, int]:
    """A packed row's document offsets (cu_seqlens, int32 as flash kernels take them) and its longest document:
    each sample, then the padding at the end as one more document (it attends only to itself and carries no
    loss)."""
    sizes = list(lengths) + ([width - sum(lengths)] if width > sum(lengths) else [])
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32), max(sizes)
