"""Compact top-k entries: a token id and its log-prob in one 32-bit word.

A cached log-prob is a log-softmax value, so it is <= 0 and the sign bit of its 16-bit float is
always set: storing the magnitude -logprob needs only the other 15 bits (5 exponent + 10 mantissa
bits for float16, 8 + 7 for bfloat16). A vocabulary of up to 2^17 = 131072 tokens (Llama-3's
128256 included) needs 17 bits per id, and 17 + 15 = 32: one uint32 word per entry, 4 bytes
instead of int32 ids + float16 log-probs (6 bytes), with the log-probs bitwise equal to float16.

    word = id | magnitude_bits << id_bits          (bit 0 is the id's lowest bit)

Megatron-LM's offline logits store the same information as uint16 low ids + a bool 17th-bit plane
+ float16 values (5 bytes per entry before zstd). Larger vocabularies take more id bits and round
the magnitude to fewer mantissa bits (``logprob_bits`` < 15; round to nearest), which
``entry_layout`` reports and the cache index records. Words are kept in int32 tensors (what
safetensors and torch handle everywhere) and decoded through int64.
"""

from __future__ import annotations

import sys

import torch

from ct_model.dtypes import dtypes

WORD_BITS = 32
MAGNITUDE_BITS = 15  # a 16-bit float without its sign
MIN_LOGPROB_BITS = 12  # below this the rounding would cost more than a smaller k would
PACKED_DTYPES = dtypes("float16", "bfloat16")


def entry_layout(vocab_size: int) -> tuple[int, int]:
    """(id_bits, logprob_bits) of a packed entry for ``vocab_size``; ValueError if too large."""
    id_bits = max(1, (vocab_size - 1).bit_length())
    logprob_bits = min(MAGNITUDE_BITS, WORD_BITS - id_bits)
    if logprob_bits < MIN_LOGPROB_BITS:
        raise ValueError(f"vocab_size={vocab_size} needs {id_bits} id bits, leaving {logprob_bits} for the "
                         f"log-prob (< {MIN_LOGPROB_BITS}); store it unpacked (logprobs_dtype=float32)")
    return id_bits, logprob_bits


def pack_entries(ids: torch.Tensor, logprobs: torch.Tensor, *, vocab_size: int,
                 dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int32 words [...] from ids [...] (in [0, vocab_size)) and log-probs [...] (<= 0).

    A positive log-prob (float rounding of a log-softmax can give +0.0 at most) is stored as 0."""
    id_bits, logprob_bits = entry_layout(vocab_size)
    ids = ids.detach().to("cpu")
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= vocab_size:
            raise ValueError(f"top-k ids outside [0, {vocab_size})")
    magnitude = (0.0 - logprobs.detach().to("cpu", torch.float32)).clamp_min_(0).to(dtype)
    words = magnitude.view(torch.int16).to(torch.int64)  # in place from here: one int64 temporary
    words &= 0x7FFF
    drop = MAGNITUDE_BITS - logprob_bits
    if drop:  # round to nearest on the bit pattern (monotone for non-negative floats)
        words = ((words + (1 << (drop - 1))) >> drop).clamp_max((1 << logprob_bits) - 1)
    words <<= id_bits
    words |= ids
    # The low 32 bits of each int64 word, reinterpreted (not converted) as int32.
    low = 0 if sys.byteorder == "little" else 1
    return words.view(torch.int32)[..., low::2].contiguous()


def unpack_entries(words: torch.Tensor, *, vocab_size: int,
                   dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64, log-probs float32) from int32 words written by ``pack_entries``."""
    id_bits, logprob_bits = entry_layout(vocab_size)
    # Masks after shifts keep everything within int32 and well defined for negative words.
    ids = (words & ((1 << id_bits) - 1)).to(torch.int64)
    bits = ((words >> id_bits) & ((1 << logprob_bits) - 1)) << (MAGNITUDE_BITS - logprob_bits)
    magnitude = bits.to(torch.int16).view(dtype).to(torch.float32)
    return ids, 0.0 - magnitude  # 0 - x, not -x: a zero magnitude gives +0.0 like the float16 plane
