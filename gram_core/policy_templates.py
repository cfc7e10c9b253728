"""The chat templates of RL policies, read back to plain text for the judge.

An RL client sends the policy's rendered prompt (e.g. ``<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n``)
and the decoded response with its end-of-turn text (``…<|im_end|>``). The judge must see the plain question and
answer in its own template: the policy's markers would otherwise read as the judge's control tokens, and a
reference without them would differ from every response in a way a policy can learn to exploit.

* ``split_query``: where the response starts in ``query`` (prompt + response as the client decoded it), also
  when the decoded prompt drifted from the original (tokenizers that do not round-trip text) or was cut from
  the left (a prompt longer than the client's budget).
* ``plain_prompt`` / ``plain_response``: the message texts without the template.

Pure string logic: no tokenizer, no torch.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["POLICY_TEMPLATES", "SPLIT_METHODS", "PolicyTemplate", "detect_template", "plain_prompt",
           "plain_response", "split_query"]

# How split_query found the response start, in extra_logs as a number: 0 = query starts with the prompt.
SPLIT_METHODS = ("prefix", "prompt_tail", "generation_header", "common_prefix")
TAIL_LENGTHS = (64, 16)  # characters of the prompt's end searched for in a drifted or left-cut query


@dataclasses.dataclass(frozen=True)
class PolicyTemplate:
    """One chat-template family: how a message is delimited and which texts end an assistant turn."""

    name: str
    message: str                 # regex with groups (role, content); the content may run to the end of the text
    generation_header: str       # what the prompt ends with when it asks the assistant to answer
    end_of_turn: tuple[str, ...]  # texts that end a response; the response is cut at the first one
    begin: tuple[str, ...] = ()  # texts dropped from the prompt's start (BOS)
    think: bool = False          # a leading <think>…</think> block is reasoning, not the answer

    def messages(self, text: str) -> list[tuple[str, str]]:
        for begin in self.begin:
            text = text.replace(begin, "")
        return [(m.group(1), m.group(2)) for m in re.finditer(self.message, text, flags=re.DOTALL)]


_CHATML = r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|(?=<\|im_start\|>)|\Z)"
POLICY_TEMPLATES = {
    "chatml": PolicyTemplate("chatml", _CHATML, "<|im_start|>assistant\n", ("<|im_end|>", "<|endoftext|>")),
    "qwen": PolicyTemplate("qwen", _CHATML, "<|im_start|>assistant\n", ("<|im_end|>", "<|endoftext|>"),
                           think=True),
    "llama3": PolicyTemplate(
        "llama3", r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|(?=<\|start_header_id\|>)|\Z)",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        begin=("<|begin_of_text|>",)),
    "gemma": PolicyTemplate(
        "gemma", r"<start_of_turn>(\w+)\n(.*?)(?:<end_of_turn>\n?|(?=<start_of_turn>)|\Z)", "<start_of_turn>model\n",
        ("<end_of_turn>", "<eos>"), begin=("<bos>",)),
}
_MARKERS = (("<|im_start|>", "qwen"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"))
_THINK = re.compile(r"\A\s*<think>.*?</think>\s*", flags=re.DOTALL)


def detect_template(prompt: str) -> PolicyTemplate | None:
    """The template whose message marker the prompt contains (ChatML is read as Qwen's, a superset), or None."""
    for marker, name in _MARKERS:
        if marker in prompt:
            return POLICY_TEMPLATES[name]
    return None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    low, high = 0, n  # binary search on slices: C-speed comparisons, O(n log n) at worst
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if a[:mid] == b[:mid] else (low, mid - 1)
    return low


def _agreement_before(query: str, end: int, prompt: str) -> int:
    """How many characters of ``query`` ending at ``end`` equal the prompt's last characters."""
    low, high = 0, min(end, len(prompt))
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if query[end - mid:end] == prompt[len(prompt) - mid:] else (low, mid - 1)
    return low


def _prompt_end(query: str, prompt: str, needle: str, start: int) -> int | None:
    """The end of the occurrence of ``needle`` (at or after ``start``) that agrees longest, backwards, with the
    prompt's end; the first one on a tie. At most 64 occurrences are weighed."""
    best, best_agreement, at = None, -1, query.find(needle, start)
    for _ in range(64):
        if at < 0:
            break
        agreement = _agreement_before(query, at + len(needle), prompt)
        if agreement > best_agreement:
            best, best_agreement = at + len(needle), agreement
        at = query.find(needle, at + 1)
    return best


def split_query(query: str, prompt: str, template: PolicyTemplate | None) -> tuple[int, int]:
    """(where the response starts in ``query``, index into SPLIT_METHODS).

    ``query`` should start with ``prompt``. When it does not (a decode that drifted, a prompt cut from the left),
    the prompt ends in the query where its last 64, else 16, characters occur (at or after the longest common
    prefix; of several occurrences, the one whose preceding text agrees longest with the prompt's end), else
    after the template's generation header chosen the same way, else at the longest common prefix.
    """
    if query.startswith(prompt):
        return len(prompt), 0
    common = _common_prefix(query, prompt)
    for n in TAIL_LENGTHS:
        if len(prompt) >= n:
            end = _prompt_end(query, prompt, prompt[-n:], max(0, common - n))
            if end is not None:
                return end, 1
    if template is not None:
        header = template.generation_header
        end = _prompt_end(query, prompt, header, max(0, common - len(header)))
        if end is not None:
            return end, 2
    return common, 3


def plain_prompt(prompt: str, template: PolicyTemplate | None) -> str:
    """The prompt's question without the template. One user message: its text. Several turns: "User: …" and
    "Assistant: …" paragraphs. System messages are dropped (a date some templates render there would change
    rewards from day to day). A prompt without the template's messages is returned as it is."""
    if template is None:
        return prompt
    turns = [(role, _THINK.sub("", content, count=1) if template.think else content)
             for role, content in template.messages(prompt) if role != "system"]
    if turns and turns[-1][0] in ("assistant", "model") and not turns[-1][1].strip():
        turns = turns[:-1]  # the generation header: the turn the response fills
    if not turns:
        return prompt if not template.messages(prompt) else ""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    names = {"user": "User", "assistant": "Assistant", "model": "Assistant"}
    return "\n\n".join(f"{names.get(role, role.title())}: {content}" for role, content in turns)


def plain_response(response: str, template: PolicyTemplate | None) -> str:
    """The response up to its first end-of-turn text; for a thinking template, without a leading think block."""
    if template is None:
        return response
    if response.startswith(template.generation_header):
        response = response[len(template.generation_header):]
    cut = min((at for at in (response.find(end) for end in template.end_of_turn) if at >= 0), default=len(response))
    response = response[:cut]
    return _THINK.sub("", response, count=1) if template.think else response
