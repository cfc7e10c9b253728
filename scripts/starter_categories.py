"""The categories of the GRAM starter dataset: seeded prompts with label-by-construction pair makers.

Used by ``scripts.build_starter`` (run from the repository root: ``python -m scripts.build_starter``). ``make_items(seed)``
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
    counterfactuals(T, rng, topics, out)
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


def counterfactuals(T: dict, rng: random.Random, topics: dict[str, list[str]], out: dict[str, list]) -> None:
    """Pairs whose surface cue points the other way, in the same subsets: all capitals that lose when ordinary
    case was asked for, a shortened answer that loses under a minimum length, an added keyword sentence that
    loses when the word is forbidden. With them no single cue decides if-caps, if-word-limit or if-keyword."""
    for part, n in (("train", 40), ("eval", 15)):
        for topic, question, instruction in open_prompts(T, topics[part], T["nocaps_instructions"], n, rng):
            def make(sample, r, topic=topic):
                base = sample or f"Here are some thoughts about {topic}: it has a long history and many people enjoy it."
                model = POLICY if sample else "template:answer"
                base = base if base != base.upper() else base.capitalize()
                return (base, model, base.upper(), model + "+uppercase"), []
            out[part].append(Item("if-caps", part, f"{question} {instruction}",
                                  {"check": "not_all_caps", "template": f"nocaps:{instruction}"}, make, True))
        for topic, question, instruction in open_prompts(T, topics[part], T["min_words_instructions"], n, rng):
            limit = rng.choice([12, 15, 18])

            def make(sample, r, topic=topic, limit=limit):
                base = sample or f"Many people find {topic} worth learning about, for its history and its details."
                model = POLICY if sample else "template:answer"
                if len(base.split()) < limit:
                    base, model = f"{base} {FILLER}", model + "+padded"
                return (base, model, shorten(base, limit // 2), model + "+shortened"), []
            out[part].append(Item("if-word-limit", part, f"{question} {instruction.format(n=limit)}",
                                  {"check": "min_words", "n": limit, "template": f"min:{instruction}"}, make, True))
        for topic, question, instruction in open_prompts(T, topics[part], T["avoid_keyword_instructions"], n, rng):
            word = rng.choice(T["keywords"])

            def make(sample, r, topic=topic, word=word):
                base = sample or f"People have many different opinions about {topic}."
                model = POLICY if sample else "template:answer"
                if S.contains_phrase(base, word):
                    other = r.choice([k for k in T["keywords"] if not S.contains_phrase(base, k)])
                    return (replace_phrase(base, word, other), model + "+keyword-replaced", base, model), []
                added = f"{base} {r.choice(T['keyword_sentences']).format(w=word)}"
                return (base, model, added, model + "+keyword"), []
            out[part].append(Item("if-keyword", part, f"{question} {instruction.format(w=word)}",
                                  {"check": "avoid_keyword", "word": word, "template": f"avoid:{instruction}"},
                                  make, True))


def safety(T: dict, rng: random.Random) -> tuple[list, list]:
    out: dict[str, list] = {"train": [], "eval": []}
    intent_train, intent_eval = split(T["harmful_intents"], 12, rng)
    for part, intents, n in (("train", intent_train, 70), ("eval", intent_eval, 30)):
        combos = [f.format(x=x) for x in intents for f in T["harmful_framings"]]
        for prompt in rng.sample(combos, n):
            def make(sample, r, prefix=""):
                refusals = r.sample(T[prefix + "refusals"], 2)
                placeholders = r.sample(T[prefix + "compliance_placeholders"], 1)
                # Counterfactuals against length and punctuation cues: a terse refusal, or one full of
                # punctuation, beats a long compliance without any brackets or lists.
                kind = r.random()
                if kind < 0.7:
                    refusal = r.choice(T[prefix + ("short_refusals" if kind < 0.3 else "detailed_refusals")])
                    return (refusal, "template:short-refusal" if kind < 0.3 else "template:detailed-refusal",
                            r.choice(T[prefix + "plain_compliance_placeholders"]), "template:plain-compliance"), \
                        [(refusals[1], "template:refusal-alt")]
                return (refusals[0], "template:refusal", placeholders[0], "template:compliance-placeholder"), \
                    [(refusals[1], "template:refusal-alt")]
            out[part].append(Item("safety-refuse", part, prompt, {"check": "refusal"}, make,
                                  alt=partial(make, prefix="eval_") if part == "eval" else None))
    benign_train, benign_eval = split(T["benign_scary"], 21, rng)
    for part, rows in (("train", benign_train), ("eval", benign_eval)):
        for prompt, answer in rows:
            def make(sample, r, answer=answer, prefix=""):
                if r.random() < 0.5:  # counterfactual: the helpful answer is the shorter text
                    return (answer, "template:helpful", r.choice(T[prefix + "long_unneeded_refusals"]),
                            "template:long-refusal"), []
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
    """The held-out families (eval only): ``if-json`` and ``count-compare``, 10 templates each.

    Built so that no surface cue (length, case, digits, symbols, nesting, prefix relation) picks the chosen
    answer much more than half the time inside a family (``gram_core.cues``; the build prints the rates), and
    no training transform appears with its label reversed: no case variants, no prefix truncations.
    """
    return json_family(T, rng, eval_countries, eval_elements) + count_family(T, rng)


JSON_REJECTS = ("wrong-value", "extra-key", "missing-key", "wrong-key", "plain", "single-quotes", "trailing-text",
                "in-a-list")


def json_family(T: dict, rng: random.Random, eval_countries: list, eval_elements: list) -> list:
    items: list[Item] = []

    def add(template: str, prompt: str, value: dict, wrong: dict, plain: str, extra: tuple[str, object],
            synonym: dict[str, str]) -> None:
        if any(i.prompt == prompt for i in items):
            return  # a repeated random draw
        style = JSON_REJECTS[len(items) % len(JSON_REJECTS)]  # every kind of wrong answer equally often

        def make(sample, r, value=value, style=style):
            chosen = json.dumps(value)
            if style == "wrong-value":
                rejected = json.dumps(wrong)
            elif style == "extra-key":
                rejected = json.dumps({**value, extra[0]: extra[1]})
            elif style == "missing-key":
                rejected = json.dumps(dict(list(value.items())[:-1]))
            elif style == "wrong-key":
                rejected = json.dumps({synonym.get(k, k): v for k, v in value.items()})
            elif style == "plain":
                rejected = plain
            elif style == "in-a-list":
                rejected = json.dumps([value])
            elif style == "single-quotes":
                rejected = chosen.replace('"', "'")
            else:
                rejected = chosen + " " + r.choice(["Hope this helps!", "Let me know if you need more.",
                                                    "That is the answer."])
            return (chosen, "template:json", rejected, f"template:{style}"), []
        items.append(Item("if-json", "eval", prompt, {"check": "json", "value": value, "template": template,
                                                      "rejected": style}, make))

    for country, capital, decoy in eval_countries[:5]:
        add("capital", f'Give the capital of {country} as a JSON object with exactly the key "capital".',
            {"capital": capital}, {"capital": decoy}, f"The capital is {capital}.", ("country", country),
            {"capital": "city"})
    symbols = [s for _, s in T["elements"]]
    for name, symbol in eval_elements[:5]:
        add("element", f'Return a JSON object with exactly the keys "element" and "symbol" for {name}.',
            {"element": name, "symbol": symbol}, {"element": name, "symbol": rng.choice([x for x in symbols if x != symbol])},
            f"{name.capitalize()} has the symbol {symbol}.", ("state", "gas"), {"symbol": "sym"})
    for name in rng.sample(T["names"], 5):
        age = rng.randint(18, 80)
        add("person-age", f'Return a JSON object with exactly the keys "name" and "age" for a person named {name} '
            f"who is {age} years old.", {"name": name, "age": age}, {"name": name, "age": age + 10},
            f"{name} is {age}.", ("city", "Paris"), {"age": "years"})
    for name, city in rng.sample(T["json_people"], 5):
        add("person-nested", f'Describe {name}, who lives in {city}, as a JSON object with exactly one key "person" '
            'whose value is an object with exactly the keys "name" and "city".',
            {"person": {"name": name, "city": city}}, {"person": {"name": city, "city": name}},
            f"The person is {name}, who lives in {city}.", ("id", 1), {"person": "people"})
    for title, author in rng.sample(T["json_books"], 5):
        add("book", f'Return the book "{title}" by {author} as a JSON object with exactly the keys "title" and '
            '"author".', {"title": title, "author": author}, {"title": author, "author": title},
            f"{title} was written by {author}.", ("year", 1900), {"author": "writer"})
    for (big, small, factor), value in rng.sample([(u, v) for u in T["units"] for v in (2, 3, 4, 6)], 5):
        add("unit", f'How many {small} are in {value} {big}? Reply with a JSON object with exactly the key '
            f'"{small}".', {small: value * factor}, {small: value * factor * 10},
            f"{value} {big} is {value * factor} {small}.", ("unit", small), {small: small[:3]})
    for _ in range(5):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        add("sum", f'What is {a} plus {b}? Answer with a JSON object with exactly the key "sum".', {"sum": a + b},
            {"sum": a + b + rng.choice([-10, -1, 1, 10])}, f"{a} plus {b} is {a + b}.", ("a", a), {"sum": "total"})
    cats = list(T["list_categories"])
    for cat in rng.sample(cats, 5):
        things = rng.sample(T["list_categories"][cat], 3)
        others = [x for c in cats if c != cat for x in T["list_categories"][c]]
        add("list", f'Return a JSON object with exactly the key "items" holding a list of these three {cat}: '
            f'{", ".join(things)}.', {"items": things}, {"items": things[:2] + [rng.choice(others)]},
            f"Here they are: {', '.join(things)}.", ("count", 3), {"items": "list"})
    for country, capital, decoy in eval_countries[5:10]:
        truth = rng.random() < 0.5
        city = capital if truth else decoy
        add("boolean", f'Is {city} the capital of {country}? Answer with a JSON object with exactly the key '
            '"answer" set to true or false.', {"answer": truth}, {"answer": not truth},
            "Yes, it is." if truth else "No, it is not.", ("country", country), {"answer": "reply"})
    for word, letter in rng.sample(T["letter_words"], 5):
        n = word.count(letter)
        add("letter-count", f'How many times does "{letter}" appear in "{word}"? Reply with a JSON object with '
            'exactly the keys "letter" and "count".', {"letter": letter, "count": n},
            {"letter": letter, "count": n + 1}, f"It appears {n} times.", ("word", word), {"count": "n"})
    return items


def count_family(T: dict, rng: random.Random) -> list:
    """Counting and comparing; each side is terse ("The answer is N.") or worked, independently drawn."""
    items: list[Item] = []

    def add(template: str, prompt: str, spec: dict, truth: str, wrong: str, worked_true: str,
            worked_wrong: str) -> None:
        if any(i.prompt == prompt for i in items):
            return  # a repeated random draw
        styles = (rng.random() < 0.5, rng.random() < 0.5)

        def make(sample, r, styles=styles):
            good = f"{worked_true} Answer: {truth}." if styles[0] else f"Answer: {truth}."
            bad = f"{worked_wrong} Answer: {wrong}." if styles[1] else f"Answer: {wrong}."
            return (good, "template:" + ("worked" if styles[0] else "terse"), bad,
                    "template:" + ("worked-wrong" if styles[1] else "terse-wrong")), []
        items.append(Item("count-compare", "eval", prompt, {"check": "number", "template": template, **spec}, make))

    for word, letter in rng.sample(T["letter_words"], 5):
        n, slip = word.count(letter), rng.choice([-1, 1])
        spelled = "-".join(word)
        add("letter-count", f'How many times does the letter "{letter}" appear in the word "{word}"?',
            {"kind": "letter_count", "word": word, "letter": letter}, str(n), str(n + slip),
            f'Spelling it out: {spelled}. I count "{letter}" {n} times.',
            f'Spelling it out: {spelled}. I count "{letter}" {n + slip} times.')
    for word, _ in rng.sample(T["letter_words"], 5):
        n = sum(word.count(v) for v in "aeiou")
        found = ", ".join(c for c in word if c in "aeiou")
        add("vowel-count", f'How many vowels (a, e, i, o, u) are in the word "{word}"?',
            {"kind": "vowel_count", "word": word}, str(n), str(n + 1),
            f"The vowels are {found}.", f"The vowels are {found} and one more.")
    for compare in ("larger", "smaller"):
        for _ in range(5):
            whole = rng.randint(1, 20)
            a, b = f"{whole}.{rng.randint(1, 9)}{rng.randint(1, 9)}", f"{whole}.{rng.randint(1, 9)}"
            if S.parse_number(a) == S.parse_number(b):
                b = f"{whole}.{(int(a[-2]) % 9) + 1}"
            big, small = (a, b) if S.parse_number(a) > S.parse_number(b) else (b, a)
            truth, wrong = (big, small) if compare == "larger" else (small, big)
            first, second = rng.sample([a, b], 2)
            add(compare, f"Which number is {compare}, {first} or {second}?", {"kind": compare, "a": a, "b": b},
                truth, wrong, f"Comparing digit by digit, {big} > {small}.",
                f"Comparing the digits, {small} > {big}.")
    pool = list(dict.fromkeys(x for xs in T["list_categories"].values() for x in xs))
    for _ in range(5):
        things = rng.sample(pool, rng.randint(3, 8))
        counted = ", ".join(f"{x} ({i + 1})" for i, x in enumerate(things))
        add("list-count", f"How many items are in this list: {', '.join(things)}?",
            {"kind": "list_count", "items": things}, str(len(things)), str(len(things) + rng.choice([-1, 1])),
            f"Counting them: {counted}.", "Counting them quickly, I lose track of one.")
    for sentence in rng.sample(T["count_sentences"], 5):
        words = sentence.split()
        add("word-count", f'How many words are in the sentence "{sentence}"?', {"kind": "list_count", "items": words},
            str(len(words)), str(len(words) + rng.choice([-1, 1])), f'Counting each word of "{sentence}".',
            "Counting the words, I merge two of them.")
    for _ in range(5):
        numbers = [str(rng.randint(1, 60)) for _ in range(rng.randint(5, 7))]
        even = sum(int(x) % 2 == 0 for x in numbers)
        add("even-count", f"How many even numbers are in this list: {', '.join(numbers)}?",
            {"kind": "even_count", "items": numbers}, str(even), str(even + 1 if even < 2 else even - 1),
            f"The even ones are {', '.join(x for x in numbers if int(x) % 2 == 0) or 'none'}.",
            "Some of the even ones are hard to spot.")
    for _ in range(5):
        numbers = [str(x) for x in rng.sample(range(10, 99), 3)]
        top = max(numbers, key=int)
        other = rng.choice([x for x in numbers if x != top])
        add("largest", f"Which is the largest of {', '.join(numbers)}?", {"kind": "largest", "items": numbers}, top,
            other, f"Checking each one, {top} beats the others.", f"Checking each one, {other} seems biggest.")
    for weeks in rng.sample(range(2, 13), 5):
        add("weeks", f"A week has 7 days. How many days are in {weeks} weeks?",
            {"kind": "arith", "expr": f"{weeks} * 7"}, str(weeks * 7), str(weeks * 7 + rng.choice([-7, 7])),
            f"{weeks} weeks times 7 days.", f"{weeks} weeks times 7 days, plus a week.")
    for a, b in zip(rng.sample(range(30, 100), 5), rng.sample(range(2, 30), 5), strict=True):
        add("difference", f"How much larger is {a} than {b}?", {"kind": "arith", "expr": f"{a} - {b}"}, str(a - b),
            str(a - b + rng.choice([-10, 10])), f"Subtracting {b} from {a}.", f"Subtracting {b} from {a} in my head.")
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
