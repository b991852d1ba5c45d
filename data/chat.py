"""Chat records: the model's own chat template, and which tokens are the assistant's.

A conversation is rendered by the tokenizer's chat template (transformers' `apply_chat_template`;
no template is written here), then tokenized segment by segment. The assistant turns' text is
located by rendering prefixes of the conversation: for assistant message i, the conversation up to
i-1 with the generation prompt ends where the reply starts, and the conversation up to i ends
where the turn (reply and its end-of-turn markup) ends. The tokens of those spans are the
training targets (mask 1); everything else (system, user and tool turns, headers) is prompt
(mask 0). Templates that rewrite earlier turns when a later one is added (Qwen3 drops old
reasoning) break the prefix property; there each reply is found by its text after the previous
one, with the template's closing markup after it. `data.train_on: all` ignores the mask.

Records in the sources are either {"messages": [{"role", "content"}, ...]} (OpenAI/HF style) or
{"prompt", "response"} (with an optional "system"), turned into messages here.
"""

from __future__ import annotations

import numpy as np

from .sources import DataError

ROLES = ("system", "user", "assistant", "tool")


class ChatError(DataError):
    pass


def messages_of(row: dict) -> list[dict] | None:
    """The record's messages (None when it has none usable); raises ChatError on a malformed one."""
    if row.get("messages") is not None:  # a table mixing both kinds has messages=None on prompt rows
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None
        out = []
        for m in msgs:
            if isinstance(m, dict) and m.get("role") in ROLES and m.get("content") is None:
                return None  # a tool-call turn without text: the record is skipped (counted)
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ChatError(f"a message must be {{role: one of {ROLES}, content: text}}, got {m!r:.120}")
            out.append({"role": m["role"], "content": m["content"]})
        return out if any(m["role"] == "assistant" for m in out) else None
    prompt, response = row.get("prompt"), row.get("response")
    if not (isinstance(prompt, str) and isinstance(response, str) and response.strip()):
        return None
    system = row.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# Templates that print today's date (Llama-3.2/3.3 call strftime_now unless given date_string) would
# tokenize differently from one day to the next, so caches filled on two days would disagree:
# every conversation is rendered with this one date.
DATE_STRING = "26 Jul 2024"


def _render(tok, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                       date_string=DATE_STRING)
    except Exception as e:  # jinja raises TemplateError for conversations a template refuses
        raise ChatError(f"the chat template refuses this conversation ({type(e).__name__}: {e})") from None


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [start, end) character spans of the assistant turns)."""
    text = _render(tok, messages, False)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = _render(tok, messages[: i + 1], False)
        before = _render(tok, messages[:i], True) if i else None
        if before is not None and text.startswith(before) and text.startswith(through) and len(before) < len(through):
            spans.append((len(before), len(through)))
        else:  # the template rewrites earlier turns: find the reply after the previous one
            at = text.find(m["content"], cursor)
            if at < 0 or not m["content"]:
                raise ChatError(f"assistant message {i} is not in the rendered conversation; the chat template "
                                "changes the reply's text, so its tokens cannot be found")
            end = at + len(m["content"])
            tail = through[through.rfind(m["content"]) + len(m["content"]):] if m["content"] in through else ""
            if tail and text.startswith(tail, end):
                end += len(tail)
            spans.append((at, end))
        cursor = spans[-1][1]
    return text, spans


def encode(tok, messages: list[dict], where="") -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask): the conversation's tokens and 1 on the assistant turns' tokens. The text is
    tokenized segment by segment (prompt, reply, prompt, ...), as a prompt is tokenized at
    inference before the model replies: a token never spans the prompt's end and the reply's
    start (BPE would merge the header's newline with a reply's leading whitespace)."""
    if not getattr(tok, "chat_template", None):
        raise ChatError(f"the tokenizer in {where} has no chat template; chat records need the model's own")
    text, spans = assistant_spans(tok, messages)
    cuts = [0] + [c for span in spans for c in span] + [len(text)]
    ids, mask = [], []
    for k in range(len(cuts) - 1):
        piece = text[cuts[k]:cuts[k + 1]]
        if piece:
            part = tok(piece, add_special_tokens=False)["input_ids"]
            ids.extend(part)
            mask.extend([k % 2] * len(part))  # odd segments are the replies
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def labels_from_mask(labels: np.ndarray, target_mask: np.ndarray | None, ignore_index: int = -100) -> np.ndarray:
    """Labels with ignore_index wherever the target token's mask is 0 (the mask aligned with the
    labels, i.e. of the next token)."""
    if target_mask is None:
        return labels
    return np.where(np.asarray(target_mask) > 0, labels, ignore_index)
