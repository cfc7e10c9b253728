"""Judge and pre-training encodings: template fidelity, shared prefix, labels, truncation, slot orders."""

import copy

import pytest
from tokenizers import normalizers

from gram_core.encoding import (
    ChatTemplateError,
    JudgeEncoder,
    PretrainEncoder,
    encode_preference_pairs,
    encode_unlabeled_pairs,
    keep_ends,
    plan_truncation,
    split_chat_template,
    tokenize,
    water_fill,
)
from gram_core.prompts import (
    JUDGE_INSTRUCTION,
    render_judge_prompt,
    render_pretrain_target,
    render_pretrain_user,
)

ORDINARY = [
    ("What is 2+2?", "It is 4.", "Probably five, or maybe 22."),
    ("Write a haiku about rain.\nKeep it short.", "Soft rain on the roof\n  drips slowly.",
     "Rain.\n\n- falls\n- stops"),
    ("def f(x): return x  # fix this?", "```python\ndef f(x):\n    return x + 1\n```", "No idea, sorry! ¯\\_(ツ)_/¯"),
    ("Translate 'Grüße' to English", " Greetings", "Greetings (\"Grüße\" means regards)."),
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from gram_core.models import ModelSourceError, load_tokenizer, resolve_model_source

    try:
        return load_tokenizer(resolve_model_source("smollm2"))
    except ModelSourceError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("smollm2_tokenizer")


SMOLLM2_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def without_default_system(text):
    """The template's rendering minus the default system turn SmolLM2's template adds (METHOD.md: none)."""
    return text.replace(SMOLLM2_DEFAULT_SYSTEM, "", 1)


def rendered_judge(tokenizer, prompt, a, b):
    return without_default_system(tokenizer.apply_chat_template(
        [{"role": "user", "content": render_judge_prompt(prompt, a, b)}], tokenize=False, add_generation_prompt=True))


def test_prefix_is_identical_for_different_pairs(tokenizer):
    encoder = JudgeEncoder(tokenizer, max_length=2048)
    first, second = encoder.encode(*ORDINARY[0]), encoder.encode(*ORDINARY[1])
    assert first.input_ids[:len(encoder.prefix_ids)] == second.input_ids[:len(encoder.prefix_ids)]
    assert first.suffix_ids != second.suffix_ids
    # exactly the template head (one BOS, from the template) and the instruction
    rendered = rendered_judge(tokenizer, *ORDINARY[0])
    assert tokenizer.decode(encoder.prefix_ids) == rendered[:rendered.index(JUDGE_INSTRUCTION)] + JUDGE_INSTRUCTION
    assert rendered.startswith("<|im_start|>") and tokenizer.decode(encoder.prefix_ids[:1]) == "<|im_start|>"


@pytest.mark.parametrize("texts", ORDINARY)
def test_decoding_reproduces_the_chat_template_rendering(tokenizer, texts):
    encoder = JudgeEncoder(tokenizer, max_length=2048)
    enc = encoder.encode(*texts)
    assert encoder.full_ids(enc) == enc.input_ids
    text = tokenizer.decode(enc.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert text == rendered_judge(tokenizer, *texts)
    assert (enc.responses_shortened, enc.prompt_shortened, enc.tokens_removed) == (0, False, 0)


@pytest.mark.parametrize("texts", ORDINARY)
def test_segments_equal_joint_tokenization_for_smollm2(smollm2_tokenizer, texts):
    encoder = JudgeEncoder(smollm2_tokenizer, max_length=2048)
    assert encoder.encode(*texts).input_ids == tokenize(smollm2_tokenizer, rendered_judge(smollm2_tokenizer, *texts))


def test_smollm2_label_ids_are_single_tokens_after_the_generation_prompt(smollm2_tokenizer):
    encoder = JudgeEncoder(smollm2_tokenizer)
    assert encoder.label_ids == (tokenize(smollm2_tokenizer, "A")[0], tokenize(smollm2_tokenizer, "B")[0])
    assert encoder.label_ids[0] != encoder.label_ids[1]
    rendered = rendered_judge(smollm2_tokenizer, *ORDINARY[0])
    assert rendered.endswith("#Preferred:<|im_end|>\n<|im_start|>assistant\n")
    for label, label_id in zip("AB", encoder.label_ids, strict=True):
        joint = tokenize(smollm2_tokenizer, rendered + label)
        assert joint == encoder.encode(*ORDINARY[0]).input_ids + [label_id]


def test_label_that_is_two_tokens_raises(tiny_tokenizer):
    broken = copy.deepcopy(tiny_tokenizer)
    broken.name_or_path = "split-A-tokenizer"
    # Every "A" becomes "A" + "\x01": two tokens for the label.
    broken.backend_tokenizer.normalizer = normalizers.Replace("A", "A\x01")
    assert len(tokenize(broken, "A")) == 2
    with pytest.raises(ChatTemplateError, match=r"split-A-tokenizer.*'A' must be exactly one token"):
        JudgeEncoder(broken)


def test_label_merging_with_the_generation_prompt_raises(smollm2_tokenizer):
    spaced = copy.deepcopy(smollm2_tokenizer)
    # A generation prompt ending in a space: " A" is one SmolLM2 token, different from "A".
    spaced.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nVerdict: {% endif %}")
    with pytest.raises(ChatTemplateError, match=r"after the generation prompt.*Verdict"):
        JudgeEncoder(spaced)


def test_plan_truncation_order():
    # fits: untouched
    assert plan_truncation(10, 20, 30, 60, floor=5) == (10, 20, 30)
    # the longer response is cut first, down to the shorter one's length
    assert plan_truncation(10, 20, 50, 60, floor=5) == (10, 20, 30)
    # then both equally
    assert plan_truncation(10, 20, 50, 40, floor=5) == (10, 15, 15)
    # responses at the floor, then the prompt
    assert plan_truncation(30, 20, 50, 20, floor=5) == (10, 5, 5)
    # prompt gone, then responses below the floor
    assert plan_truncation(30, 20, 50, 6, floor=5) == (0, 3, 3)
    with pytest.raises(ValueError, match="3 tokens over"):
        plan_truncation(1, 1, 1, -3, floor=5)
    assert water_fill([7, 7], 13) == [6, 6]  # symmetric: equal lengths get equal cuts
    assert keep_ends(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert keep_ends(list(range(10)), 1) == [0]


def test_truncation_keeps_scaffolding_and_cuts_responses_first(tokenizer):
    encoder = JudgeEncoder(tokenizer, max_length=1 << 16, response_floor=16)
    long_text = " ".join(f"word{i}" for i in range(400))
    prompt = "Summarise the text."
    full = encoder.encode(prompt, long_text, "Short answer.")
    assert full.tokens_removed == 0
    max_length = len(full.input_ids) - 100
    encoder = JudgeEncoder(tokenizer, max_length=max_length, response_floor=16)
    enc = encoder.encode(prompt, long_text, "Short answer.")
    assert len(enc.input_ids) <= max_length
    assert (enc.responses_shortened, enc.prompt_shortened) == (1, False)
    assert enc.tokens_removed == len(full.input_ids) - len(enc.input_ids)
    assert enc.tokens_removed >= 100
    text = tokenizer.decode(enc.input_ids)
    assert text.endswith(rendered_judge(tokenizer, "", "", "").split("[The End of Assistant B's Answer]")[1])
    assert "Short answer.\n[The End of Assistant B's Answer]\n\n#Preferred:" in text
    assert f"[User Question]\n{prompt}\n\n" in text
    assert enc.suffix_ids[-len(encoder.end_ids):] == encoder.end_ids


def test_truncation_cuts_the_prompt_after_responses_reach_the_floor(tiny_tokenizer):
    probe = JudgeEncoder(tiny_tokenizer, max_length=4096, response_floor=8)
    prompt = " ".join(f"q{i}" for i in range(200))
    long_a, long_b = "a " * 100, "b " * 120
    max_length = probe.fixed_length + 60
    encoder = JudgeEncoder(tiny_tokenizer, max_length=max_length, response_floor=8)
    enc = encoder.encode(prompt, long_a, long_b)
    assert (enc.responses_shortened, enc.prompt_shortened) == (2, True)
    assert len(enc.input_ids) == max_length  # 44 prompt tokens + 8 + 8 fill the budget exactly
    lengths = [len(tokenize(tiny_tokenizer, t)) for t in (prompt, long_a, long_b)]
    assert enc.tokens_removed == sum(lengths) - 60
    too_small = JudgeEncoder(tiny_tokenizer, max_length=probe.fixed_length - 1)
    with pytest.raises(ValueError, match=r"pair 'p7'.*max_length is"):
        too_small.encode("q", "a", "b", pair_id="p7")


def preference_rows(n):
    return [{"pair_id": f"p{i}", "prompt": f"Question {i}?", "chosen": f"good answer {i}",
             "rejected": f"bad answer {i}"} for i in range(n)]


def test_random_half_puts_chosen_in_slot_a_for_half_the_pairs(tiny_tokenizer):
    encoder = JudgeEncoder(tiny_tokenizer, max_length=2048)
    examples, stats = encode_preference_pairs(encoder, preference_rows(11), order="random_half", seed=1)
    assert [e["pair_id"] for e in examples] == [f"p{i}" for i in range(11)]
    assert stats["chosen_in_a"] == 5 and stats["pairs"] == 11 and stats["examples"] == 11
    for example in examples:
        text = tiny_tokenizer.decode(example["suffix_ids"])
        slot_a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
        assert slot_a.startswith("good" if example["label"] == 0 else "bad")
    again, _ = encode_preference_pairs(encoder, preference_rows(11), order="random_half", seed=1)
    other, _ = encode_preference_pairs(encoder, preference_rows(11), order="random_half", seed=2)
    assert [e["label"] for e in again] == [e["label"] for e in examples]
    assert [e["label"] for e in other] != [e["label"] for e in examples]


def test_both_orders_truncate_a_pair_identically(tiny_tokenizer):
    rows = [{"pair_id": "x", "prompt": "Q?", "chosen": "good " * 80, "rejected": "bad " * 80}]
    probe = JudgeEncoder(tiny_tokenizer, max_length=4096)
    encoder = JudgeEncoder(tiny_tokenizer, max_length=probe.fixed_length + 101, response_floor=8)
    examples, stats = encode_preference_pairs(encoder, rows, order="both")
    assert [e["label"] for e in examples] == [0, 1]
    assert stats["examples"] == 2 and stats["chosen_in_a"] == 1 and stats["responses_shortened"] == 4
    texts = [tiny_tokenizer.decode(e["suffix_ids"]) for e in examples]
    kept = [t.count("good") for t in texts] + [t.count("bad") for t in texts]
    assert kept[0] == kept[1] and kept[2] == kept[3] and 0 < kept[0] < 80
    single = encoder.encode("Q?", "good " * 80, "bad " * 80)
    assert stats["tokens_removed"] == 2 * single.tokens_removed > 0


def test_missing_column_names_the_row(tiny_tokenizer):
    encoder = JudgeEncoder(tiny_tokenizer, max_length=2048)
    rows = preference_rows(2)
    del rows[1]["rejected"]
    with pytest.raises(KeyError, match=r"row 1 \(pair_id 'p1'\) lacks column\(s\) \['rejected'\]"):
        encode_preference_pairs(encoder, rows)


def test_pretrain_labels_cover_target_and_end_of_turn_only(tokenizer):
    encoder = PretrainEncoder(tokenizer, max_length=2048)
    prompt, a, b = ORDINARY[1]
    out = encoder.encode(prompt, a, b)
    rendered = without_default_system(tokenizer.apply_chat_template(
        [{"role": "user", "content": render_pretrain_user(prompt)},
         {"role": "assistant", "content": render_pretrain_target(a, b)}], tokenize=False))
    assert tokenizer.decode(out["input_ids"]) == rendered
    assert len(out["labels"]) == len(out["input_ids"])
    labelled = [t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != -100]
    assert labelled == [label for label in out["labels"] if label != -100]
    assert tokenizer.decode(labelled) == render_pretrain_target(a, b) + "<|im_end|>"
    # one contiguous labelled span; the trailing "\n" after <|im_end|> is masked
    first = out["labels"].index(labelled[0])
    assert out["labels"][first:first + len(labelled)] == labelled
    assert tokenizer.decode(out["input_ids"][first + len(labelled):]) == "\n"
    assert out["labels"][-1] == -100


def test_encode_unlabeled_pairs_with_both_encoders(tiny_tokenizer):
    rows = [{"pair_id": "u0", "prompt": "Hi?", "response_a": "Hello.", "response_b": "Hey."}]
    pre, pre_stats = encode_unlabeled_pairs(PretrainEncoder(tiny_tokenizer, max_length=512), rows)
    assert set(pre[0]) == {"pair_id", "input_ids", "labels"} and pre_stats["pairs"] == 1
    judge_encoder = JudgeEncoder(tiny_tokenizer, max_length=2048)
    judged, _ = encode_unlabeled_pairs(judge_encoder, rows)
    assert judged[0]["suffix_ids"] == judge_encoder.encode("Hi?", "Hello.", "Hey.").suffix_ids


def test_no_system_turn_in_any_sequence(smollm2_tokenizer):
    from gram_core.baseline import RewardEncoder

    texts = [smollm2_tokenizer.decode(ids) for ids in (
        JudgeEncoder(smollm2_tokenizer, max_length=2048).encode(*ORDINARY[0]).input_ids,
        PretrainEncoder(smollm2_tokenizer, max_length=2048).encode(*ORDINARY[0])["input_ids"],
        RewardEncoder(smollm2_tokenizer, max_length=2048).encode(*ORDINARY[0][:2]))]
    for text in texts:
        assert "system" not in text and "SmolLM" not in text
        assert text.startswith("<|im_start|>user\n")


def test_explicit_system_prompt_is_one_system_turn(smollm2_tokenizer):
    encoder = JudgeEncoder(smollm2_tokenizer, max_length=2048, system_prompt="Judge fairly.")
    text = smollm2_tokenizer.decode(encoder.encode(*ORDINARY[0]).input_ids)
    assert text.startswith("<|im_start|>system\nJudge fairly.<|im_end|>\n<|im_start|>user\n")
    assert text.count("system") == 1


LLAMA3_STYLE = (
    "{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "{{ '<|begin_of_text|>' }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ' "
    "+ date_string + '\n\n' + sys + '<|eot_id|>' }}"
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_default_system_turn_with_a_date_is_removed(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = LLAMA3_STYLE
    head, tail = split_chat_template(tok, ["user"], add_generation_prompt=True)
    assert head == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert tail == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_template_that_renders_the_date_is_refused(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
                         "{% for m in messages %}{{ 'Today: ' + date_string + '\n' + m['role'] + ': ' + "
                         "m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChatTemplateError, match="renders the date"):
        JudgeEncoder(tok, max_length=2048)
