"""The categories of the GRAM starter dataset: seeded prompts with label-by-construction pair makers.

Used by ``scripts/build_starter.py`` (which puts the repository root on ``sys.path`` first). ``make_items(seed)``
returns every training and eval ``Item``; each category builder draws from one shared ``random.Random``, so
the order of the calls in ``make_items`` is part of the dataset's definition.

No eval text may be a training text (see ``normalize``): where a training template could put a training text
into an eval pair, the eval item has an ``alt`` maker (the same random choices with eval-only templates:
tables.json ``eval_*`` lists, eval-only phrasing), which the builder uses for the eval pairs that collide.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial

from gram_core import starter as S

POLICY = "SmolLM2-135M-Instruct"
DANGLING = {"a", "an", "the", "and", "or", "but", "of", "for", "to", "in", "on", "at", "with", "by", "its", "their",
            "is", "are", "that", "which", "as", "from", "this", "your", "my"}
FILLER = "There is much more that could be said about this, and many details are worth exploring further."


@dataclass
class Item:
    """One prompt of the dataset; ``make(sample, rng)`` returns (chosen, chosen_model, rejected, rejected_model)
    and extra pool responses [(text, generator)]. ``alt`` (eval items only): the eval-only variant of ``make``
    (same signature), used when a text of ``make``'s pair is a training text; ``alt_rng`` is a fresh copy of
    ``rng`` for it, so the variant makes the same random choices."""

    category: str
    split: str
    prompt: str
    spec: dict
    make: object
    sample: bool = False
    rng: random.Random = field(default=None)
    alt: object = None
    alt_rng: random.Random = field(default=None)


def normalize(text: str) -> str:
    """The form in which eval and training texts must differ: casefolded, whitespace collapsed, stripped."""
    return " ".join(text.casefold().split())


def fmt(x: Fraction) -> str:
    """A terminating decimal without trailing zeros ("12", "2.5")."""
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.6f}".rstrip("0").rstrip(".")


def split(items: list, n_eval: int, rng: random.Random) -> tuple[list, list]:
    """Seeded shuffle, then (train, eval)."""
    items = list(items)
    rng.shuffle(items)
    return items[n_eval:], items[:n_eval]


def sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence end; the "3." of a numbered list is not one."""
    return [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)
            if not re.search(r"(^|\s)\d+\.$", text[:m.end()])]


def clean_sample(text: str | None) -> str | None:
    """Cut a sampled response after its last complete sentence (samples stop at max_new_tokens)."""
    if not text:
        return None
    text = text.strip()
    ends = sentence_ends(text)
    if ends and ends[-1] != len(text) and ends[-1] >= 20:
        text = text[:ends[-1]]
    return text if len(text) >= 3 else None


def replace_phrase(text: str, old: str, new: str) -> str:
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new, text, flags=re.IGNORECASE)


def shorten(text: str, n: int) -> str:
    """The longest prefix ending a sentence within ``n`` words, else the first ``n`` words with a period."""
    ends = sentence_ends(text)
    fitting = [e for e in ends if len(text[:e].split()) <= n]
    if fitting:
        return text[:fitting[-1]].strip()
    words = text.split()[:n]
    while len(words) > 1 and words[-1].lower().strip(",;:-") in DANGLING:
        words.pop()  # don't end on "for" / "and" / "the"
    return " ".join(words).rstrip(",;:-") + "."


# ------------------------------------------------------------------------------------------------
# Categories: each returns (train items, eval items)
# ------------------------------------------------------------------------------------------------


def chat_facts(T: dict, rng: random.Random) -> tuple[list, list]:
    out: dict[str, list] = {"train": [], "eval": []}
    caps_train, caps_eval = split(T["capitals"], 24, rng)
    for part, rows in (("train", caps_train), ("eval", caps_eval)):
        for country, capital, decoy in rows:
            others = [r for r in T["capitals"] if r[0] != country]
            prompt = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                                 "Tell me the capital city of {c}."]).format(c=country)

            def make(sample, r, country=country, capital=capital, decoy=decoy, others=others):
                template = f"The capital of {country} is {capital}."
                if sample and S.contains_phrase(sample, capital) and not S.contains_phrase(sample, decoy):
                    chosen, model, extras = sample, POLICY, [(template, "template:answer")]
                else:
                    chosen, model, extras = template, "template:answer", []
                if r.random() < 0.5:  # hard negative: the same text naming a big non-capital city
                    return (chosen, model, replace_phrase(chosen, capital, decoy), model + "+swapped-answer"), extras
                other = r.choice(others)
                return (chosen, model, f"The capital of {other[0]} is {other[1]}.", "template:off-topic"), extras

            # Eval-only variant: "<capital> is the capital of <country>." (training says "The capital of ... is"),
            # off-topic answers name eval countries only.
            same_split = [row for row in rows if row[0] != country]

            def alt(sample, r, country=country, capital=capital, decoy=decoy, others=same_split):
                if sample and S.contains_phrase(sample, capital) and not S.contains_phrase(sample, decoy):
                    chosen, model = sample, POLICY
                else:
                    chosen, model = f"{capital} is the capital of {country}.", "template:answer"
                if r.random() < 0.5:
                    return (chosen, model, replace_phrase(chosen, capital, decoy), model + "+swapped-answer"), []
                other = r.choice(others)
                return (chosen, model, f"{other[1]} is the capital of {other[0]}.", "template:off-topic"), []
            out[part].append(Item("chat-facts", part, prompt, {"check": "contains", "fact": ["capitals", country],
                                                               "answer": capital}, make, sample=True,
                                  alt=alt if part == "eval" else None))
    el_train, el_eval = split(T["elements"], 7, rng)
    for part, rows in (("train", el_train), ("eval", el_eval)):
        for name, symbol in rows:
            prompt = rng.choice(["What is the chemical symbol for {e}?", "Which chemical symbol stands for {e}?"])
            wrong = rng.choice([s for n, s in T["elements"] if s != symbol])

            def make(sample, r, name=name, symbol=symbol, wrong=wrong):
                return (f"The chemical symbol for {name} is {symbol}.", "template:answer",
                        f"The chemical symbol for {name} is {wrong}.", "template:wrong-answer"), []
            out[part].append(Item("chat-facts", part, prompt.format(e=name),
                                  {"check": "contains", "fact": ["elements", name], "answer": symbol}, make))
    combos = [(u, v) for u in T["units"] for v in ("2", "3", "4", "5", "6", "8", "10", "12", "2.5", "1.5")]
    unit_train, unit_eval = split(rng.sample(combos, 40), 10, rng)
    for part, rows in (("train", unit_train), ("eval", unit_eval)):
        for (big, small, factor), value in rows:
            truth = S.parse_number(value) * factor
            wrong = rng.choice([truth * 10, truth / 10, truth + factor, S.parse_number(value) + factor])
            wrong = truth * 10 if wrong == truth else wrong  # 1.5 + 3 == 1.5 * 3
            prompt = rng.choice(["How many {s} are in {v} {b}?", "Convert {v} {b} to {s}."]).format(
                s=small, v=value, b=big)

            def make(sample, r, big=big, small=small, value=value, truth=truth, wrong=wrong):
                return (f"{value} {big} equals {fmt(truth)} {small}.", "template:answer",
                        f"{value} {big} equals {fmt(wrong)} {small}.", "template:wrong-factor"), []
            out[part].append(Item("chat-facts", part, prompt, {"check": "number", "kind": "unit", "value": value,
                                                               "big": big, "small": small}, make))
    def_train, def_eval = split(T["definitions"], 12, rng)
    for part, rows in (("train", def_train), ("eval", def_eval)):
        for word, meaning in rows:
            other = rng.choice([d for w, d in T["definitions"] if w != word])
            prompt = rng.choice(['What does the word "{w}" mean?', 'Define the word "{w}".',
                                 'What is the meaning of "{w}"?']).format(w=word)

            def make(sample, r, word=word, meaning=meaning, other=other):
                return (f'"{word.capitalize()}" means {meaning}.', "template:answer",
                        f'"{word.capitalize()}" means {other}.', "template:wrong-definition"), []
            out[part].append(Item("chat-facts", part, prompt, {"check": "contains", "fact": ["definitions", word],
                                                               "answer": meaning}, make))
    return out["train"], out["eval"]


def open_prompts(T: dict, topics: list[str], instructions: list[str], n: int,
                 rng: random.Random) -> list[tuple[str, str, str]]:
    """``n`` distinct (topic, question, instruction) prompts."""
    combos = [(t, q, i) for t in topics for q in T["open_questions"] for i in instructions]
    return [(t, q.format(t=t), i) for t, q, i in rng.sample(combos, n)]


def instruction_following(T: dict, rng: random.Random, topics: dict[str, list[str]]) -> tuple[list, list]:
    out: dict[str, list] = {"train": [], "eval": []}
    for part, n in (("train", 60), ("eval", 25)):
        for topic, question, instruction in open_prompts(T, topics[part], T["caps_instructions"], n, rng):
            def make(sample, r, topic=topic):
                base = sample or f"Here are some thoughts about {topic}: it has a long history and many people enjoy it."
                model = POLICY if sample else "template:answer"
                if base != base.upper():
                    return (base.upper(), model + "+uppercase", base, model), []
                return (base, model, base.capitalize(), model + "+lowercase"), []
            out[part].append(Item("if-caps", part, f"{question} {instruction}", {"check": "all_caps"}, make, True))
        for topic, question, instruction in open_prompts(T, topics[part], T["word_limit_instructions"], n, rng):
            limit = rng.choice([8, 10, 12, 15])

            def make(sample, r, topic=topic, limit=limit):
                base = sample or f"Many people find {topic} worth learning about, for its history and its details."
                model = POLICY if sample else "template:answer"
                if len(base.split()) > limit:
                    return (shorten(base, limit), model + "+shortened", base, model), []
                return (base, model, f"{base} {FILLER}", model + "+padded"), []
            out[part].append(Item("if-word-limit", part, f"{question} {instruction.format(n=limit)}",
                                  {"check": "max_words", "n": limit}, make, True))
        for topic, question, instruction in open_prompts(T, topics[part], T["keyword_instructions"], n, rng):
            word = rng.choice(T["keywords"])

            def make(sample, r, topic=topic, word=word):
                base = sample or f"People have many different opinions about {topic}."
                model = POLICY if sample else "template:answer"
                if S.contains_phrase(base, word):
                    other = r.choice([k for k in T["keywords"] if not S.contains_phrase(base, k)])
                    return (base, model, replace_phrase(base, word, other), model + "+keyword-replaced"), []
                added = f"{base} {r.choice(T['keyword_sentences']).format(w=word)}"
                return (added, model + "+keyword", base, model), []
            out[part].append(Item("if-keyword", part, f"{question} {instruction.format(w=word)}",
                                  {"check": "keyword", "word": word}, make, True))
    cat_train, cat_eval = split(sorted(T["list_categories"]), 5, rng)
    for part, cats, n in (("train", cat_train, 60), ("eval", cat_eval, 25)):
        combos = [(c, k, t) for c in cats for k in (2, 3, 4, 5) for t in T["bullet_instructions"]]
        for cat, k, template in rng.sample(combos, n):
            def make(sample, r, cat=cat, k=k):
                items = r.sample(T["list_categories"][cat], k + 1)
                intro = r.choice(["", f"Here are {k} {cat}:\n"])
                chosen = intro + "\n".join(f"- {x}" for x in items[:k])
                style = r.choice(["more", "fewer", "prose"] if k > 2 else ["more", "prose"])
                if style == "prose":
                    return (chosen, "template:list", f"Some {cat} are {', '.join(items[:k - 1])} and "
                            f"{items[k - 1]}.", "template:no-bullets"), []
                count = k + 1 if style == "more" else k - 1
                return (chosen, "template:list", intro + "\n".join(f"- {x}" for x in items[:count]),
                        "template:miscounted-list"), []
            out[part].append(Item("if-bullets", part, template.format(n=k, c=cat), {"check": "bullets", "n": k},
                                  make))
    return out["train"], out["eval"]


def safety(T: dict, rng: random.Random) -> tuple[list, list]:
    out: dict[str, list] = {"train": [], "eval": []}
    intent_train, intent_eval = split(T["harmful_intents"], 12, rng)
    for part, intents, n in (("train", intent_train, 70), ("eval", intent_eval, 30)):
        combos = [f.format(x=x) for x in intents for f in T["harmful_framings"]]
        for prompt in rng.sample(combos, n):
            def make(sample, r, prefix=""):
                refusals = r.sample(T[prefix + "refusals"], 2)
                placeholders = r.sample(T[prefix + "compliance_placeholders"], 1)
                return (refusals[0], "template:refusal", placeholders[0], "template:compliance-placeholder"), \
                    [(refusals[1], "template:refusal-alt")]
            out[part].append(Item("safety-refuse", part, prompt, {"check": "refusal"}, make,
                                  alt=partial(make, prefix="eval_") if part == "eval" else None))
    benign_train, benign_eval = split(T["benign_scary"], 21, rng)
    for part, rows in (("train", benign_train), ("eval", benign_eval)):
        for prompt, answer in rows:
            def make(sample, r, answer=answer, prefix=""):
                return (answer, "template:helpful", r.choice(T[prefix + "unneeded_refusals"]), "template:refusal"), []
            out[part].append(Item("safety-respond", part, prompt, {"check": "compliance"}, make,
                                  alt=partial(make, prefix="eval_") if part == "eval" else None))
    return out["train"], out["eval"]


def math_problem(T: dict, rng: random.Random) -> tuple[str, str, str, str]:
    """(prompt, expr, worked answer, worked wrong answer) of one arithmetic word problem."""
    name, thing = rng.choice(T["names"]), rng.choice(T["countables"])
    a, b, c = rng.randint(12, 60), rng.randint(2, 11), rng.randint(1, 9)
    kind = rng.choice(["add", "sub", "mul", "div", "price", "two_step", "speed"])
    if kind == "add":
        prompt, expr = f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?", f"{a} + {b}"
    elif kind == "sub":
        prompt, expr = f"{name} has {a} {thing} and gives {b} of them to a friend. How many {thing} are left?", f"{a} - {b}"
    elif kind == "mul":
        prompt, expr = f"There are {b} boxes with {c + 2} {thing} in each box. How many {thing} are there?", f"{b} * {c + 2}"
    elif kind == "div":
        prompt = f"{name} shares {b * (c + 1)} {thing} equally among {b} friends. How many {thing} does each friend get?"
        expr = f"{b * (c + 1)} / {b}"
    elif kind == "price":
        prompt, expr = f"One notebook costs {c + 1} dollars. How much do {b} notebooks cost, in dollars?", f"{c + 1} * {b}"
    elif kind == "speed":
        prompt = f"A car drives at {a} kilometers per hour for {c + 1} hours. How many kilometers does it travel?"
        expr = f"{a} * {c + 1}"
    else:
        prompt = (f"{name} has {a} {thing}, buys {b} more and then gives away {c}. "
                  f"How many {thing} does {name} have now?")
        s, r = a + b, a + b - c
        return prompt, f"{a} + {b} - {c}", (f"{a} + {b} = {s}, then {s} - {c} = {r}. The answer is {r}."), \
            rng.choice([f"{a} + {b} = {s}. The answer is {s}.",
                        f"{a} + {b} = {s}, then {s} - {c} = {r + 1}. The answer is {r + 1}."])
    truth = S.evaluate_arithmetic(expr)
    wrong = truth + rng.choice([-2, -1, 1, 2, 10] if truth > 2 else [1, 2, 10])  # a slip, never negative
    return prompt, expr, f"{expr.replace('*', 'x')} = {fmt(truth)}. The answer is {fmt(truth)}.", \
        f"{expr.replace('*', 'x')} = {fmt(wrong)}. The answer is {fmt(wrong)}."


def reasoning(T: dict, rng: random.Random) -> tuple[list, list]:
    out: dict[str, list] = {"train": [], "eval": []}
    seen: set[str] = set()
    for part, n in (("train", 110), ("eval", 35)):
        while len(out[part]) < n:
            prompt, expr, good, bad = math_problem(T, rng)
            if prompt in seen:
                continue
            seen.add(prompt)

            def make(sample, r, good=good, bad=bad, expr=expr):
                short = f"The answer is {fmt(S.evaluate_arithmetic(expr))}."
                return (good, "template:worked-answer", bad, "template:wrong-answer"), [(short, "template:short-answer")]

            def alt(sample, r, good=good, bad=bad):  # eval-only phrasing: "..., so the answer is N."
                return (good.replace(". The answer is ", ", so the answer is "), "template:worked-answer",
                        bad.replace(". The answer is ", ", so the answer is "), "template:wrong-answer"), []
            out[part].append(Item("math-word", part, prompt, {"check": "number", "kind": "arith", "expr": expr}, make,
                                  alt=alt if part == "eval" else None))
    return out["train"], out["eval"]


def heldout(T: dict, rng: random.Random, eval_countries: list, eval_elements: list) -> list:
    items: list[Item] = []

    def json_item(prompt: str, value: dict, plain: str, plain_alt: str | None = None) -> None:
        """``plain_alt``: the eval-only plain-text answer, for a ``plain`` that training texts may contain."""
        def make(sample, r, plain=plain):
            style = r.choice(["plain", "keys", "broken"])
            if style == "plain":
                rejected, model = plain, "template:plain-text"
            elif style == "keys":
                rejected, model = json.dumps({k.upper(): v for k, v in value.items()}), "template:wrong-keys"
            else:
                rejected, model = json.dumps(value)[:-1], "template:broken-json"
            return (json.dumps(value), "template:json", rejected, model), []
        items.append(Item("if-json", "eval", prompt, {"check": "json", "value": value}, make,
                          alt=partial(make, plain=plain_alt) if plain_alt else None))
    for country, capital, _ in eval_countries[:12]:
        json_item(f'Give the capital of {country} as a JSON object with the key "capital".', {"capital": capital},
                  f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}.")
    for name, symbol in eval_elements:
        json_item(f'Return a JSON object with the keys "element" and "symbol" for {name}.',
                  {"element": name, "symbol": symbol}, f"Element: {name}, symbol: {symbol}")
    for name in rng.sample(T["names"], 11):
        age = rng.randint(18, 80)
        json_item(f'Return a JSON object with the keys "name" and "age" for a person named {name} who is {age} '
                  "years old.", {"name": name, "age": age}, f"Name: {name}, age: {age}")

    def number_item(prompt: str, spec: dict, good: str, bad: str) -> None:
        def make(sample, r):
            return (good, "template:worked-answer", bad, "template:wrong-answer"), []
        items.append(Item("count-compare", "eval", prompt, {"check": "number", **spec}, make))
    for word, letter in rng.sample(T["letter_words"], 14):
        n = word.count(letter)
        spelled = "-".join(word)
        number_item(f'How many times does the letter "{letter}" appear in the word "{word}"?',
                    {"kind": "letter_count", "word": word, "letter": letter},
                    f'Spelling it out: {spelled}. The letter "{letter}" appears {n} times.',
                    f'Spelling it out: {spelled}. The letter "{letter}" appears {n + rng.choice([-1, 1])} times.')
    compared: set[tuple[str, str]] = set()
    while len(compared) < 13:
        whole = rng.randint(1, 20)
        a, b = f"{whole}.{rng.randint(1, 9)}{rng.randint(1, 9)}", f"{whole}.{rng.randint(1, 9)}"
        if (a, b) in compared:
            continue
        compared.add((a, b))
        big, small = (a, b) if S.parse_number(a) > S.parse_number(b) else (b, a)
        first, second = rng.sample([a, b], 2)
        number_item(f"Which number is larger, {first} or {second}?", {"kind": "larger", "a": a, "b": b},
                    f"Compare the digits after the decimal point: {big} is larger than {small}. The answer is {big}.",
                    f"{small} is larger than {big}. The answer is {small}.")
    pool = list(dict.fromkeys(x for xs in T["list_categories"].values() for x in xs))
    for _ in range(13):
        things = rng.sample(pool, rng.randint(3, 8))
        counted = ", ".join(f"{x} ({i + 1})" for i, x in enumerate(things))
        wrong = len(things) + rng.choice([-1, 1])
        number_item(f"How many items are in this list: {', '.join(things)}?", {"kind": "list_count", "items": things},
                    f"Counting them: {counted}. The answer is {len(things)}.",
                    f"Counting them quickly, I get {wrong}. The answer is {wrong}.")
    return items


# ------------------------------------------------------------------------------------------------
# All categories
# ------------------------------------------------------------------------------------------------


def make_items(seed: int) -> tuple[list[Item], list[Item]]:
    """(train items, eval items) of every category, each item with its own seeded ``rng``."""
    T = S.starter_tables()
    rng = random.Random(seed)
    topics = dict(zip(("train", "eval"), split(T["topics"], 33, rng), strict=True))
    train: list[Item] = []
    evals: list[Item] = []
    for builder in (chat_facts, safety, reasoning):
        tr, ev = builder(T, rng)
        train, evals = train + tr, evals + ev
    tr, ev = instruction_following(T, rng, topics)
    train, evals = train + tr, evals + ev
    eval_countries = [r for r in T["capitals"] if any(i.spec.get("fact") == ["capitals", r[0]] for i in evals)]
    eval_elements = [r for r in T["elements"] if any(i.spec.get("fact") == ["elements", r[0]] for i in evals)]
    evals += heldout(T, rng, eval_countries, eval_elements)
    for item in train + evals:
        item.rng = random.Random(f"{seed}:{item.category}:{item.prompt}")
        item.alt_rng = random.Random(f"{seed}:{item.category}:{item.prompt}")
    return train, evals
