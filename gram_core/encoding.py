"""Token encodings of GRAM examples: stage-2 judge sequences and stage-1 pre-training sequences.

A sequence is the concatenation of separately tokenized segments (chat-template pieces, scaffolding, the
prompt, each response), so truncation cuts whole tokens of one segment only and the judge prefix (template
head + instruction) is token-identical for every pair. The chat template is used by rendering it with
sentinel strings as message contents and splitting the text at the sentinels; every piece is tokenized with
``add_special_tokens=False`` because the template text already carries BOS and headers (tokenizing with
special tokens would duplicate BOS, a defect of the authors' code, METHOD.md section 7).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable

import numpy as np

from gram_core import prompts

SENTINEL = "@@GRAM_SEGMENT_{}@@"
DEFAULT_RESPONSE_FLOOR = 64


class ChatTemplateError(ValueError):
    """The tokenizer's chat template or vocabulary cannot express the GRAM format as required."""


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def tokenize(tokenizer, text: str, literal: bool = False) -> list[int]:
    """Token ids of ``text`` alone, without BOS/EOS added by the tokenizer. ``literal``: a special token's text
    (e.g. "<|im_end|>") is split into ordinary tokens, never read as the control token."""
    if not text:
        return []
    options = {"split_special_tokens": True} if literal else {}
    return list(tokenizer(text, add_special_tokens=False, **options)["input_ids"])


def _render_pieces(tokenizer, roles: list[str], add_generation_prompt: bool, **kwargs) -> list[str]:
    """Render a chat of ``roles`` with sentinel contents; the n + 1 texts around the n contents."""
    messages = [{"role": role, "content": SENTINEL.format(i)} for i, role in enumerate(roles)]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)
    pieces = []
    for i in range(len(roles)):
        before, sep, text = text.partition(SENTINEL.format(i))
        if not sep or SENTINEL.format(i) in text:
            raise ChatTemplateError(f"chat template of {tokenizer_name(tokenizer)!r} does not place the "
                                    f"{roles[i]} message content verbatim exactly once")
        pieces.append(before)
    return pieces + [text]


def _without_default_system(tokenizer, pieces: list[str], roles: list[str], add_generation_prompt: bool,
                            **kwargs) -> list[str]:
    """``pieces`` with the system turn a template injects when none is given (SmolLM2, Qwen) removed.

    Rendering with an explicit system message gives its header (before the content) and the text up to the
    first user content; if the plain rendering is that header + some default text + that text, the default
    turn is cut: what stays is anything before the turn opener (e.g. BOS) and the user turn's own header.
    """
    sys_pieces = _render_pieces(tokenizer, ["system"] + roles, add_generation_prompt, **kwargs)
    sys_head, sys_between = sys_pieces[0], sys_pieces[1]
    head = pieces[0]
    injected = (head.startswith(sys_head) and head.endswith(sys_between)
                and len(head) >= len(sys_head) + len(sys_between))
    if not injected:
        return pieces
    role_at = sys_head.rfind("system")
    for start in range(max(role_at, 0)):
        opener = sys_head[start:role_at]
        at = sys_between.rfind(opener + roles[0])
        if role_at > 0 and at >= 0:
            return [sys_head[:start] + sys_between[at:]] + pieces[1:]
    raise ChatTemplateError(
        f"chat template of {tokenizer_name(tokenizer)!r} adds a default system turn "
        f"({head[len(sys_head):len(head) - len(sys_between)]!r:.80}) that cannot be removed automatically; set "
        "encode.system_prompt to state the system message explicitly")


def _template_pieces(tokenizer, roles: list[str], add_generation_prompt: bool, system_prompt: str | None,
                     **kwargs) -> list[str]:
    if system_prompt is None:
        return _without_default_system(tokenizer, _render_pieces(tokenizer, roles, add_generation_prompt, **kwargs),
                                       roles, add_generation_prompt, **kwargs)
    sys_pieces = _render_pieces(tokenizer, ["system"] + roles, add_generation_prompt, **kwargs)
    return [sys_pieces[0] + system_prompt + sys_pieces[1]] + sys_pieces[2:]


def split_chat_template(tokenizer, roles: list[str], add_generation_prompt: bool,
                        system_prompt: str | None = None) -> list[str]:
    """Render a chat of ``roles`` with sentinel contents and return the text around them.

    For n messages the result has n + 1 pieces: head, the n - 1 pieces between contents, tail. With
    ``system_prompt`` None there is no system turn (METHOD.md section 3), even where the template adds a
    default one; a string becomes an explicit system message inside the head. A template whose output
    changes with the date (e.g. Llama 3's 'Today Date: ...') is refused: encodings would change daily.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"tokenizer {tokenizer_name(tokenizer)!r} has no chat template")
    pieces = _template_pieces(tokenizer, roles, add_generation_prompt, system_prompt)
    other_day = _template_pieces(tokenizer, roles, add_generation_prompt, system_prompt, date_string="01 Jan 1999")
    today = datetime.date.today()
    stamps = {today.strftime(f) for f in ("%d %b %Y", "%Y-%m-%d", "%B %d, %Y", "%d %B %Y")}
    if other_day != pieces or any(stamp in "".join(pieces) for stamp in stamps):
        raise ChatTemplateError(f"chat template of {tokenizer_name(tokenizer)!r} renders the date into the "
                                "sequence, so encodings would change from day to day; use a template without a "
                                "date (set tokenizer.chat_template) or a system_prompt that keeps it out")
    return pieces


def tokenize_before(tokenizer, first: str, second: str) -> list[int]:
    """Tokens of ``first`` as they appear when ``first + second`` is tokenized jointly (when they split
    cleanly there), so a segment boundary does not change how ``first`` ends (e.g. a trailing "\\n\\n")."""
    joint, tail = tokenize(tokenizer, first + second), tokenize(tokenizer, second)
    if tail and joint[-len(tail):] == tail:
        return joint[:-len(tail)]
    return tokenize(tokenizer, first)


def water_fill(lengths: list[int], budget: int) -> list[int]:
    """Cut the longest first: min(length_i, L) with the largest integer level L whose total fits ``budget``.

    Symmetric in its inputs (equal lengths get equal cuts), so both slot orders truncate a pair alike.
    """
    if sum(lengths) <= budget:
        return list(lengths)
    low, high = 0, max(lengths)  # invariant: level `low` fits, level `high` does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if sum(min(n, mid) for n in lengths) <= budget else (low, mid)
    return [min(n, low) for n in lengths]


def plan_truncation(prompt_len: int, a_len: int, b_len: int, budget: int, floor: int) -> tuple[int, int, int]:
    """Kept lengths (prompt, a, b) within ``budget`` tokens: responses (longer first) down to ``floor``,
    then the prompt, then responses below the floor. Raises ValueError if nothing fits (budget < 0)."""
    if prompt_len + a_len + b_len <= budget:
        return prompt_len, a_len, b_len
    floors = [min(a_len, floor), min(b_len, floor)]
    if budget - prompt_len >= sum(floors):
        return (prompt_len, *water_fill([a_len, b_len], budget - prompt_len))
    if budget >= sum(floors):
        return (budget - sum(floors), *floors)
    if budget >= 0:
        return (0, *water_fill([a_len, b_len], budget))
    raise ValueError(f"the fixed scaffolding alone is {-budget} tokens over max_length")


def keep_ends(ids: list[int], keep: int) -> list[int]:
    """The first ceil(keep/2) and last floor(keep/2) tokens (a long prompt's question is often at its end)."""
    if keep >= len(ids):
        return ids
    head = keep - keep // 2
    return ids[:head] + (ids[len(ids) - keep // 2:] if keep // 2 else [])


@dataclasses.dataclass
class JudgeEncoding:
    """One judge sequence after the shared prefix, with what truncation removed."""

    suffix_ids: list[int]  # everything after the prefix, ending with the generation prompt
    responses_shortened: int  # 0, 1 or 2 responses cut
    prompt_shortened: bool
    tokens_removed: int
    prefix_ids: list[int] = dataclasses.field(default_factory=list, repr=False)
    a_start: int = 0  # where response A begins in suffix_ids (after question, prompt and the A header)
    b_start: int = 0  # where the text after response A (B header, response B, verdict cue) begins

    @property
    def input_ids(self) -> list[int]:
        """The full sequence; its last token's logits predict the verdict."""
        return self.prefix_ids + self.suffix_ids


class JudgeEncoder:
    """Stage-2 judge sequences: [template head + instruction] | question, answers, verdict cue, gen prompt."""

    def __init__(self, tokenizer, max_length: int = 1024, label_a: str = "A", label_b: str = "B",
                 response_floor: int = DEFAULT_RESPONSE_FLOOR, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.response_floor = response_floor
        # Texts from outside (a reward server's requests) set this: their special-token strings stay plain text.
        self.literal = False
        head, tail = split_chat_template(tokenizer, ["user"], add_generation_prompt=True, system_prompt=system_prompt)
        self.tail_text = tail
        # The prefix ends with "\n\n": tokenize it as it appears before "[User Question]".
        self.prefix_ids = tokenize_before(tokenizer, head + prompts.JUDGE_INSTRUCTION, prompts.QUESTION_HEAD)
        self.question_ids = tokenize(tokenizer, prompts.QUESTION_HEAD)
        self.a_head_ids = tokenize(tokenizer, prompts.A_HEAD)
        self.between_ids = tokenize(tokenizer, prompts.A_TAIL + prompts.B_HEAD)
        self.end_ids = tokenize(tokenizer, prompts.B_TAIL + prompts.VERDICT_CUE + tail)
        self.fixed_length = (len(self.prefix_ids) + len(self.question_ids) + len(self.a_head_ids)
                             + len(self.between_ids) + len(self.end_ids))
        self.label_ids = (self.check_label(label_a), self.check_label(label_b))

    def check_label(self, label: str) -> int:
        """The id of ``label``: one token standalone, and the same single token after the generation prompt."""
        ids = tokenize(self.tokenizer, label)
        after = tokenize(self.tokenizer, self.tail_text + label)
        # The real sequence end (verdict cue + generation prompt) followed by the label must split the same way.
        end_after = tokenize(self.tokenizer, prompts.B_TAIL + prompts.VERDICT_CUE + self.tail_text + label)
        if len(ids) != 1 or after != tokenize(self.tokenizer, self.tail_text) + ids or end_after != self.end_ids + ids:
            pieces = [self.tokenizer.convert_ids_to_tokens(x) for x in (ids, after[-3:])]
            raise ChatTemplateError(
                f"tokenizer {tokenizer_name(self.tokenizer)!r}: verdict label {label!r} must be exactly one token, "
                f"the same standalone and after the generation prompt {self.tail_text!r}; standalone it is "
                f"{pieces[0]} (ids {ids}), after the generation prompt the sequence ends {pieces[1]} "
                f"(ids {after[-3:]}). Choose other labels (encode.label_a / label_b).")
        return ids[0]

    def encode(self, prompt: str, response_a: str, response_b: str, pair_id: str | None = None) -> JudgeEncoding:
        """Encode one pair (truncated to max_length as in plan_truncation); ``pair_id`` names it in errors."""
        p, a, b = (tokenize(self.tokenizer, _text(t, n, pair_id), self.literal) for t, n in
                   ((prompt, "prompt"), (response_a, "response_a"), (response_b, "response_b")))
        kept = _fit(p, a, b, self, pair_id)
        p_kept, a_kept, b_kept = keep_ends(p, kept[0]), a[:kept[1]], b[:kept[2]]
        suffix = (self.question_ids + p_kept + self.a_head_ids + a_kept + self.between_ids + b_kept
                  + self.end_ids)
        a_start = len(self.question_ids) + len(p_kept) + len(self.a_head_ids)
        return JudgeEncoding(suffix_ids=suffix, responses_shortened=int(kept[1] < len(a)) + int(kept[2] < len(b)),
                             prompt_shortened=kept[0] < len(p), tokens_removed=len(p) + len(a) + len(b) - sum(kept),
                             prefix_ids=self.prefix_ids, a_start=a_start, b_start=a_start + len(a_kept))

    def full_ids(self, encoding: JudgeEncoding) -> list[int]:
        return self.prefix_ids + encoding.suffix_ids


class PretrainEncoder:
    """Stage-1 sequences: user turn "[User Question]\\n{x}\\n\\n", assistant target with both answers.

    Labels are -100 on the template head, the user turn and the assistant header, and on anything in the
    template tail after the end-of-turn token; the target and the end-of-turn token carry loss.
    """

    def __init__(self, tokenizer, max_length: int = 1024, response_floor: int = DEFAULT_RESPONSE_FLOOR,
                 system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.response_floor = response_floor
        head, middle, tail = split_chat_template(tokenizer, ["user", "assistant"], add_generation_prompt=False,
                                                 system_prompt=system_prompt)
        self.head_ids = tokenize(tokenizer, head + prompts.QUESTION_HEAD)
        self.middle_ids = tokenize(tokenizer, prompts.PRETRAIN_QUESTION_TAIL + middle)
        self.a_head_ids = tokenize(tokenizer, prompts.PRETRAIN_A_HEAD)
        self.between_ids = tokenize(tokenizer, prompts.A_TAIL + prompts.B_HEAD)
        self.b_tail_ids = tokenize(tokenizer, prompts.B_TAIL)
        self.tail_ids, self.tail_labelled = self.end_of_turn(tail)
        self.fixed_length = sum(len(x) for x in (self.head_ids, self.middle_ids, self.a_head_ids,
                                                 self.between_ids, self.b_tail_ids, self.tail_ids))

    def end_of_turn(self, tail: str) -> tuple[list[int], int]:
        """Tail ids and how many of them carry loss: up to and including the first special token (the
        end-of-turn token); a tail without one gets the EOS token appended."""
        tok = self.tokenizer
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        ids = tokenize(tok, tail)
        for index, token_id in enumerate(ids):
            if token_id in special:
                return ids, index + 1
        if tok.eos_token_id is None:
            raise ChatTemplateError(f"tokenizer {tokenizer_name(tok)!r}: the assistant turn ends with {tail!r}, "
                                    "which has no special end-of-turn token, and there is no EOS token")
        return ids + [tok.eos_token_id], len(ids) + 1

    def encode(self, prompt: str, response_a: str, response_b: str, pair_id: str | None = None) -> dict:
        """dict(input_ids, labels, responses_shortened, prompt_shortened, tokens_removed)."""
        p, a, b = (tokenize(self.tokenizer, _text(t, n, pair_id)) for t, n in
                   ((prompt, "prompt"), (response_a, "response_a"), (response_b, "response_b")))
        kept = _fit(p, a, b, self, pair_id)
        p_kept, a_kept, b_kept = keep_ends(p, kept[0]), a[:kept[1]], b[:kept[2]]
        context = self.head_ids + p_kept + self.middle_ids
        target = self.a_head_ids + a_kept + self.between_ids + b_kept + self.b_tail_ids
        tail = self.tail_ids
        n_tail = self.tail_labelled
        input_ids = context + target + tail
        labels = [-100] * len(context) + target + tail[:n_tail] + [-100] * (len(tail) - n_tail)
        return {"input_ids": input_ids, "labels": labels,
                "responses_shortened": int(kept[1] < len(a)) + int(kept[2] < len(b)),
                "prompt_shortened": kept[0] < len(p), "tokens_removed": len(p) + len(a) + len(b) - sum(kept)}


def _text(value, name: str, pair_id) -> str:
    if not isinstance(value, str):
        raise TypeError(f"pair {pair_id!r}: {name} must be a string, got {type(value).__name__} {value!r:.80}")
    return value


def _fit(p: list[int], a: list[int], b: list[int], encoder, pair_id) -> tuple[int, int, int]:
    """Kept (prompt, a, b) lengths for ``encoder``'s max_length, or a ValueError naming the pair."""
    budget = encoder.max_length - encoder.fixed_length
    try:
        return plan_truncation(len(p), len(a), len(b), budget, encoder.response_floor)
    except ValueError as err:
        raise ValueError(f"pair {pair_id!r} does not fit even with an empty prompt and empty responses: the "
                         f"fixed template and scaffolding take {encoder.fixed_length} tokens, max_length is "
                         f"{encoder.max_length}; raise max_length") from err


def _rows(rows: Iterable[dict], keys: tuple[str, ...]) -> list[dict]:
    rows = list(rows)
    for index, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise KeyError(f"row {index} (pair_id {row.get('pair_id')!r}) lacks column(s) {missing}; "
                           f"expected {list(keys)}")
    return rows


def _stats(encodings: list, pairs: int) -> dict:
    def get(enc, key):
        return enc[key] if isinstance(enc, dict) else getattr(enc, key)

    return {"pairs": pairs, "examples": len(encodings),
            "examples_shortened": sum(get(e, "tokens_removed") > 0 for e in encodings),
            "responses_shortened": sum(get(e, "responses_shortened") for e in encodings),
            "prompts_shortened": sum(bool(get(e, "prompt_shortened")) for e in encodings),
            "tokens_removed": sum(get(e, "tokens_removed") for e in encodings)}


def encode_preference_pairs(encoder: JudgeEncoder, rows: Iterable[dict], order: str = "random_half",
                            seed: int = 0) -> tuple[list[dict], dict]:
    """Labelled stage-2 examples dict(pair_id, suffix_ids, label) with label 0 = A wins, 1 = B wins.

    order="random_half": the chosen response goes to slot A for a seeded random floor(n/2) of the pairs
    (slot B for the rest); order="both": every pair twice, chosen in A then in B.
    """
    if order not in ("random_half", "both"):
        raise ValueError(f"order must be 'random_half' or 'both', got {order!r}")
    rows = _rows(rows, ("pair_id", "prompt", "chosen", "rejected"))
    if order == "both":
        slots = [(i, chosen_in_a) for i in range(len(rows)) for chosen_in_a in (True, False)]
    else:
        in_a = set(np.random.default_rng(seed).permutation(len(rows))[: len(rows) // 2].tolist())
        slots = [(i, i in in_a) for i in range(len(rows))]
    examples, encodings = [], []
    for index, chosen_in_a in slots:
        row = rows[index]
        a, b = (row["chosen"], row["rejected"]) if chosen_in_a else (row["rejected"], row["chosen"])
        enc = encoder.encode(row["prompt"], a, b, pair_id=row["pair_id"])
        encodings.append(enc)
        examples.append({"pair_id": row["pair_id"], "suffix_ids": enc.suffix_ids, "label": 0 if chosen_in_a else 1})
    stats = _stats(encodings, len(rows))
    stats["chosen_in_a"] = sum(e["label"] == 0 for e in examples)
    return examples, stats


def encode_unlabeled_pairs(encoder: JudgeEncoder | PretrainEncoder, rows: Iterable[dict]) -> tuple[list[dict], dict]:
    """Unlabelled pairs (pair_id, prompt, response_a, response_b), slots as given: with a PretrainEncoder
    dict(pair_id, input_ids, labels) for stage 1; with a JudgeEncoder dict(pair_id, suffix_ids) for scoring."""
    rows = _rows(rows, ("pair_id", "prompt", "response_a", "response_b"))
    examples, encodings = [], []
    for row in rows:
        enc = encoder.encode(row["prompt"], row["response_a"], row["response_b"], pair_id=row["pair_id"])
        encodings.append(enc)
        if isinstance(enc, JudgeEncoding):
            examples.append({"pair_id": row["pair_id"], "suffix_ids": enc.suffix_ids})
        else:
            examples.append({"pair_id": row["pair_id"], "input_ids": enc["input_ids"], "labels": enc["labels"]})
    return examples, _stats(encodings, len(rows))
