"""Chat-message columns -> text: the last assistant turn is the response, the turns before it the prompt."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from data_contracts import Contract, ContractError, Violation

# Columns that hold a response (chat-message lists are flattened into these).
RESPONSE_COLUMNS = ("response", "response_a", "response_b", "chosen", "rejected")


def _message_text(messages: Any) -> tuple[str, str]:
    """(prompt, response) from a chat message list: the last turn is the response (role assistant).
    Raises ValueError saying what is wrong (never turns a missing or non-text content into text)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"expected a list of chat messages {{role, content}}, got {str(messages)[:60]!r}")
    for index, message in enumerate(messages):
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} has content {message.get('content')!r:.40}; expected text")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message has role {messages[-1].get('role')!r}; expected 'assistant'")
    turns = messages[:-1]
    if len(turns) == 1 and turns[0].get("role") == "user":
        prompt = turns[0]["content"]
    else:  # multi-turn context: keep every turn, labeled, in order
        prompt = "\n\n".join(f"{str(m.get('role', '')).capitalize()}: {m['content']}" for m in turns)
    return prompt, messages[-1]["content"]


def flatten_conversations(table: pa.Table, contract: Contract, column_map: dict[str, str], where: str) -> pa.Table:
    """Replace chat-message list columns that feed response columns by text; derive ``prompt`` from them.
    Rows that are not well-formed conversations are one ContractError naming the column and rows."""
    targets = {src: column_map.get(src, src) for src in table.column_names}
    convo = [src for src, dst in targets.items() if dst in RESPONSE_COLUMNS and contract.schema.get_field_index(dst) >= 0
             and pa.types.is_list(table.schema.field(src).type)]
    if not convo:
        raise ValueError(f"{where}: conversations=true but no response column holds message lists "
                         f"(columns {table.column_names}, column_map {column_map})")
    prompts: list[str] | None = None
    violations = []
    for src in convo:
        pairs, bad = [], []
        for i, messages in enumerate(table[src].to_pylist()):
            try:
                pairs.append(_message_text(messages))
            except ValueError as err:
                bad.append((i, str(err)))
                pairs.append(("", ""))
        if bad:
            violations.append(Violation(src, "not a well-formed conversation", "a list of {role, content} "
                                        "messages with text content, the last one from the assistant", len(bad),
                                        tuple(i for i, _ in bad[:5]), tuple(m for _, m in bad[:5])))
            continue
        table = table.set_column(table.column_names.index(src), src, pa.array([r for _, r in pairs], pa.string()))
        prompts = prompts or [p for p, _ in pairs]
    if violations:
        raise ContractError(where, contract, violations)
    has_prompt = any(dst == "prompt" for dst in targets.values())
    if not has_prompt and prompts is not None:
        table = table.append_column("prompt", pa.array(prompts, pa.string()))
    return table
