"""ct_data: tokenizer, sources, weighted mixing, packing, SFT formatting, resumable loader, sample data.

Imports only torch, numpy, tokenizers and (lazily) datasets / transformers.
"""

from ct_data.answers import extract_boxed_answer, extract_gsm8k_answer, answers_match, normalize_answer
from ct_data.chat import LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS, render_chat
from ct_data.config import DataConfigError, SourceConfig
from ct_data.loader import PackedLoader, build_pretrain_loader, build_sft_loader, merge_states
from ct_data.mixture import DataMixture, load_data_config
from ct_data.prepare import tokenize_sources
from ct_data.prepared import PreparedSource
from ct_data.sources import DataSourceError
from ct_data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DataConfigError",
    "DataMixture",
    "DataSourceError",
    "LLAMA3_CHAT_TEMPLATE",
    "LLAMA3_SPECIAL_TOKENS",
    "PackedLoader",
    "PreparedSource",
    "SourceConfig",
    "Tokenizer",
    "answers_match",
    "build_pretrain_loader",
    "build_sft_loader",
    "extract_boxed_answer",
    "extract_gsm8k_answer",
    "load_data_config",
    "load_tokenizer",
    "merge_states",
    "normalize_answer",
    "render_chat",
    "tokenize_sources",
    "train_tokenizer",
]
