"""The LLaMA-3 chat format, rendered in Python with the character spans of assistant turns.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>

(no line breaks between turns; contents are stripped, as the LLaMA-3 template does). The same
format is saved as a Jinja ``chat_template`` beside trained tokenizers, so HF's
``apply_chat_template`` renders the identical string. Loss masks come from the spans: the content
of each assistant turn and its closing ``<|eot_id|>`` are trained, headers and other turns are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PAD = "<|finetune_right_pad_id|>"
PYTHON_TAG = "<|python_tag|>"

ROLES = ("system", "user", "assistant", "ipython", "tool")

# The LLaMA-3 special tokens, in the order the LLaMA-3.1/3.2 vocabulary numbers them (128000..).
LLAMA3_SPECIAL_TOKENS = (
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD,
    "<|reserved_special_token_2|>",
    START_HEADER,
    END_HEADER,
    EOM,
    EOT,
    PYTHON_TAG,
)

# Jinja form of render_chat, for HF apply_chat_template; kept byte-equivalent to render_chat (tested).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (bad roles, non-string content, no assistant turn)."""


def header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def validate_messages(messages: Any, *, require_assistant: bool = True) -> list[dict[str, str]]:
    """Check a ``messages`` value; return it as a list of {role, content} dicts or raise ChatFormatError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} is not a dict")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) has non-string content")
        out.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise ChatFormatError("conversation has no non-empty assistant turn")
    return out


def render_chat(
    messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False, bos: bool = True
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` in the LLaMA-3 format.

    Returns the string and the [start, end) character spans of the trained part of every assistant
    turn (its stripped content followed by ``<|eot_id|>``). An assistant turn whose content is empty
    or blank is rendered (header and ``<|eot_id|>``) as context but has no span: it is not trained,
    the conversation's other assistant turns are.
    """
    parts: list[str] = [BOS] if bos else []
    n = len(parts[0]) if bos else 0
    spans: list[tuple[int, int]] = []
    for m in messages:
        h = header(m["role"])
        body = m["content"].strip() + EOT
        parts.append(h)
        parts.append(body)
        n += len(h)
        if m["role"] == "assistant" and m["content"].strip():  # an empty turn is context, not trained
            spans.append((n, n + len(body)))
        n += len(body)
    if add_generation_prompt:
        parts.append(header("assistant"))
    return "".join(parts), spans
