"""The instruction template, in one place: its special tokens, the loss mask and its Jinja form.

    <|user|> user text <|end|> <|assistant|> reply text <|end|> <|user|> ...

The four special tokens take the ids just past the tokenizer's vocabulary (`vocab_size + i`), the
spare rows of the padded embedding, so adding them never resizes it. `render` builds the ids and
the loss labels in the same pass, so the template and the mask cannot drift apart; `CHAT_TEMPLATE`
is the same template in Jinja, written into exported Hugging Face and GGUF models (a test renders
both and compares).

Label convention -- **labels are aligned with ids**: `labels[i]` is the token that position `i`
should predict, i.e. `ids[i + 1]` when that next token is assistant content or the `<|end|>`
closing an assistant turn, and `IGNORE_INDEX` otherwise (user text, role tokens, the user's
`<|end|>`, the last position, padding). The trainer compares `logits[:, i]` with `labels[:, i]`
directly and must NOT shift again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: The template's special tokens, in id order (`vocab_size + 0` is `<|user|>`).
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>", "<|pad|>")
N_CHAT_TOKENS = len(CHAT_TOKENS)

#: Loss label for positions that carry no loss (PyTorch's `cross_entropy` default ignore_index).
IGNORE_INDEX = -100

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: Role
    """Who speaks: ``"user"`` or ``"assistant"`` (a chat file's system message is folded into the
    first user turn by ``read_chat``)."""
    content: str
    """The message text, exactly as it will be encoded."""
    references: tuple[str, ...] = ()
    """Every acceptable answer when the dataset lists several (SQuAD); used by ``lmforge eval``
    for exact-match/F1. Empty means ``content`` is the only reference."""

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"Turn.role must be 'user' or 'assistant', not {self.role!r}")


Conversation = list[Turn]
Example = tuple[list[int], list[int]]
"""A rendered conversation: ``(ids, labels)`` of equal length, labels aligned with ids."""


@dataclass(frozen=True)
class ChatIds:
    """Ids of the template's special tokens for one tokenizer."""

    user: int
    assistant: int
    end: int
    pad: int


def chat_ids(tokenizer: Any) -> ChatIds:
    """The template token ids: from ``tokenizer.special_ids`` when listed there, else the
    convention ``vocab_size + i`` (the spare ids of the padded vocabulary)."""
    special = getattr(tokenizer, "special_ids", None) or {}
    ids = [special.get(name, tokenizer.vocab_size + i) for i, name in enumerate(CHAT_TOKENS)]
    return ChatIds(*ids)


def render(conversation: Conversation, tokenizer: Any, max_len: int | None = None) -> Example:
    """Render a conversation to ``(ids, labels)``: the template and the loss mask in one pass.

    Per turn: ``<|user|> text <|end|>`` or ``<|assistant|> text <|end|>`` (no final eot).
    ``labels[i] = ids[i + 1]`` when ``ids[i + 1]`` is an assistant content token or the
    ``<|end|>`` closing an assistant turn, else ``IGNORE_INDEX``; so the last position never has a
    label. ``max_len`` keeps the first ``max_len`` tokens (the new last position loses its label,
    its target was cut).
    """
    tok = chat_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for turn in conversation:
        content = tokenizer.encode(turn.content)
        if turn.role == "assistant":
            # <|assistant|> predicts the first content token, ..., the last content token
            # predicts <|end|>; <|end|> itself predicts the next role token: no loss.
            ids += [tok.assistant, *content, tok.end]
            labels += [*content, tok.end, IGNORE_INDEX]
        else:
            ids += [tok.user, *content, tok.end]
            labels += [IGNORE_INDEX] * (len(content) + 2)
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
        if labels:
            labels[-1] = IGNORE_INDEX
    return ids, labels


def render_prompt(conversation_so_far: Conversation, tokenizer: Any) -> list[int]:
    """Ids to generate the next assistant reply from: the template of the turns so far, then
    ``<|assistant|>``. Generation stops at ``<|end|>``."""
    ids, _ = render(conversation_so_far, tokenizer)
    return ids + [chat_ids(tokenizer).assistant]


def stop_ids(tokenizer: Any) -> list[int]:
    """Where an assistant reply ends: its `<|end|>`, or a role token or end-of-text."""
    ids = chat_ids(tokenizer)
    return [ids.end, ids.user, ids.assistant, tokenizer.eot_id]


# `render` as a Jinja template (Hugging Face's `chat_template`, GGUF's tokenizer.chat_template).
# System messages are folded into the first user turn (joined by a blank line), as `read_chat` does.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + message['content'] -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "<|user|>{{ (ns.system + '\n\n' + message['content']) if ns.system else message['content'] }}"
    "<|end|>{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# The same template as an Ollama Modelfile (Go template; Ollama does not run Jinja): `FROM` the
# exported GGUF, then these lines. System messages are left out, as lmforge's models never saw one.
OLLAMA_MODELFILE = (
    'TEMPLATE """{{ range .Messages }}{{ if eq .Role "user" }}<|user|>{{ .Content }}<|end|>'
    '{{ else if eq .Role "assistant" }}<|assistant|>{{ .Content }}<|end|>{{ end }}{{ end }}'
    '<|assistant|>"""\n'
    "PARAMETER stop <|end|>\n"
    "PARAMETER temperature 0\n"
)
