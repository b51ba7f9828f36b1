"""Chat records -> template-rendered token examples whose labels cover the assistant turns only.

Assistant spans are found by rendering prefixes: the text of messages[:i] with the generation prompt
ends where assistant turn i starts, the text of messages[:i+1] ends where it stops. Both must be
prefixes of the whole conversation's rendering (true of ChatML, Llama, Mistral, ... templates); a
template that rewrites earlier turns (e.g. drops old reasoning) is refused in one line. A token is
trained when its first character lies in an assistant span, so the end-of-turn token is trained too
(and, with a template that has no generation prompt, the assistant header).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE = -100
CHAT_FIELDS = ("messages", "conversations")  # OpenAI role/content, ShareGPT from/value
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TEMPLATE_CHOICES = "auto (the tokenizer's, if it has one), none, or a .jinja file"

Messages = list[dict[str, str]]


class ChatError(ValueError):
    """A chat record or template problem, in one line (the caller adds the file and record)."""


def resolve_template(tokenizer: PreTrainedTokenizerBase, choice: str | None) -> str | None:
    """The Jinja chat template to render with: 'none' -> None, 'auto' -> the tokenizer's (or None), else a file's text."""
    if choice in (None, "", "none"):
        return None
    if choice == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ChatError(f"--chat_template {choice} is not a file; pass {TEMPLATE_CHOICES}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"--chat_template {choice} cannot be read ({type(e).__name__}); pass a UTF-8 .jinja file") from None


def chat_field(columns: Sequence[str]) -> str | None:
    """'messages' or 'conversations' when the records hold chats, else None."""
    return next((f for f in CHAT_FIELDS if f in columns), None)


def to_messages(turns: Any) -> Messages:
    """A record's turns as [{'role', 'content'}], ShareGPT's from/value mapped; ChatError if malformed or no assistant turn."""
    if not isinstance(turns, list) or not turns:
        raise ChatError(f"the conversation is {type(turns).__name__ if turns is not None else 'missing'}, not a list of turns; "
                        "write a list of {\"role\", \"content\"} objects")
    out: Messages = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, Mapping):
            raise ChatError(f"turn {n} is a {type(turn).__name__}, not an object; write {{\"role\": ..., \"content\": ...}}")
        if turn.get("role") is not None:
            role, content = turn.get("role"), turn.get("content")
        elif turn.get("from") is not None:
            role, content = SHAREGPT_ROLES.get(str(turn["from"]).lower(), turn["from"]), turn.get("value")
        else:
            raise ChatError(f"turn {n} has no 'role' (or ShareGPT 'from'); give every turn a role")
        if not isinstance(content, str):
            raise ChatError(f"turn {n} ({role}) has {type(content).__name__} content, not a string; make it text")
        out.append({"role": str(role), "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError("the conversation has no assistant turn, so nothing would be trained; add one or drop the record")
    return out


def pair_messages(prompt: str, response: str) -> Messages:
    """A prompt/response (or alpaca) record as a one-exchange chat."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _render(tokenizer: PreTrainedTokenizerBase, template: str, messages: Messages, generation: bool) -> str:
    """The template's text for `messages` (with the assistant header after them when `generation`)."""
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as e:  # jinja raises TemplateError, TypeError, raise_exception(...) from the template itself
        first = (str(e).strip().splitlines() or [""])[0]
        raise ChatError(f"the chat template failed to render it ({type(e).__name__}: {first}); fix the record "
                        "or pass --chat_template FILE.jinja (or none)") from None
    if not isinstance(text, str):
        raise ChatError("the chat template did not render to text; pass --chat_template FILE.jinja")
    return text


def render_prompt(tokenizer: PreTrainedTokenizerBase, template: str, messages: Messages) -> str:
    """The text a model is prompted with: `messages` then the assistant header, as the trained turns began."""
    return _render(tokenizer, template, messages, generation=True)


def render_spans(messages: Messages, tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation's text, the [start, end) character spans of its assistant turns)."""
    full = _render(tokenizer, template, messages, generation=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], generation=True) if i else ""
        through = _render(tokenizer, template, messages[: i + 1], generation=False)
        start = len(before)
        if not (full.startswith(before) and full.startswith(through) and len(through) > start):
            raise ChatError(f"the chat template is not prefix-stable at turn {i + 1} (rendering the first turns alone "
                            "does not give the start of the whole conversation), so the assistant tokens cannot be "
                            "found; pass --chat_template FILE.jinja with a template that renders turns in order")
        spans.append((start, len(through)))
    return full, spans


def tokenize_chats(
    conversations: Sequence[Messages], tokenizer: PreTrainedTokenizerBase, template: str, wheres: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation: labels are the ids inside assistant spans, -100 elsewhere.

    wheres[i] names conversation i in errors ("dataset x.jsonl record 7").
    """
    if not conversations:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise ChatError("chat data needs a fast tokenizer (character offsets); pass a folder with tokenizer.json")
    texts, all_spans = [], []
    for messages, where in zip(conversations, wheres, strict=True):
        try:
            text, spans = render_spans(messages, tokenizer, template)
        except ChatError as e:
            raise ChatError(f"{where}: {e}") from None
        texts.append(text)
        all_spans.append(spans)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], all_spans, strict=True):
        labels = [t if any(a <= o[0] < b for a, b in spans) else IGNORE for t, o in zip(ids, offsets, strict=True)]
        out.append((list(ids), labels))
    return out
