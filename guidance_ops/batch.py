"""Rows of a batched model call.

ComfyUI evaluates several conditionings in one forward pass: the batch is a concatenation of equal-sized
chunks, and ``cond_or_uncond`` names the conditioning index of each chunk in order (0 = positive,
1 = negative, 2.. = extra passes that patches add).
"""
import torch


def chunk_rows(cond_or_uncond, total_rows, wanted, device=None):
    """Boolean mask over the batch rows that belong to a chunk whose index is in ``wanted``."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or total_rows % chunks:
        raise ValueError(f"a batch of {total_rows} rows cannot be split into {chunks} equal chunks")
    per_chunk = total_rows // chunks
    hit = torch.tensor([c in wanted for c in cond_or_uncond], dtype=torch.bool, device=device)
    return hit.repeat_interleave(per_chunk)


def without_chunks(cond_or_uncond, unwanted):
    """``cond_or_uncond`` of the rows that remain once the chunks in ``unwanted`` are taken out."""
    return [c for c in cond_or_uncond if c not in unwanted]


def merge_rows(mask, taken, rest):
    """Put ``taken`` back at the rows where ``mask`` is set and ``rest`` everywhere else (dim 0)."""
    out = taken.new_empty((mask.shape[0],) + tuple(taken.shape[1:]))
    out[mask] = taken
    out[~mask] = rest.to(taken.dtype)
    return out
