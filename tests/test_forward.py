"""Answer-position logits against full-vocabulary logits of unpadded full sequences, with and without a
shared prefix (list or PrefixCache), plain and LoRA-wrapped; gradients through the prefix; cache reuse."""

import pytest
import torch

from gram_core.batching import pad_right
from gram_core.forward import answer_logits, build_prefix_cache

PREFIX = list(range(200, 231))  # token ids used only in the prefix (not suffixes, not labels)
SUFFIXES = [list(range(50, 62)), list(range(70, 75)), [100, 101], list(range(120, 129))]
LABELS = (35, 36)


@pytest.fixture()
def model(tiny_model):
    # Larger weights than the default init so logits are O(1) and attention is far from uniform: a wrong
    # position, mask or row would move the logits by much more than the tolerance.
    torch.manual_seed(0)
    with torch.no_grad():
        for param in tiny_model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return tiny_model.eval()


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    # init_lora_weights=False: random B, so the adapters change the outputs (B = 0 would hide inactive LoRA).
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    return get_peft_model(model, config)


def reference(model, suffixes=SUFFIXES, prefix=PREFIX):
    """Full-vocabulary logits of each unpadded full sequence at its last token, label columns only."""
    rows = [model(input_ids=torch.tensor([prefix + s])).logits[0, -1, list(LABELS)] for s in suffixes]
    return torch.stack(rows)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("mode", ["list", "cache", "none"])
def test_answer_logits_match_full_vocab_logits(model, wrap, mode):
    model = lora(model) if wrap else model
    expected = reference(model)
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 0.1  # the rows carry real signal
    if mode == "none":
        ids, mask = pad_right([PREFIX + s for s in SUFFIXES], pad_id=0)
        got = answer_logits(model, ids, mask, LABELS)
    else:
        ids, mask = pad_right(SUFFIXES, pad_id=0)
        prefix = PREFIX if mode == "list" else build_prefix_cache(model, PREFIX)
        got = answer_logits(model, ids, mask, LABELS, prefix=prefix)
    assert got.shape == (len(SUFFIXES), 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lora_adapters_are_active(model):
    wrapped = lora(model)
    ids, mask = pad_right(SUFFIXES, pad_id=0)
    with_lora = answer_logits(wrapped, ids, mask, LABELS, prefix=PREFIX)
    with wrapped.disable_adapter():
        without = answer_logits(wrapped, ids, mask, LABELS, prefix=PREFIX)
    assert (with_lora - without).abs().max() > 1e-2


def test_gradients_flow_through_a_list_prefix(model):
    model.train()  # no dropout in the tiny Llama; train mode as in training
    ids, mask = pad_right(SUFFIXES, pad_id=0)
    labels = torch.tensor([0, 1, 1, 0])
    loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, mask, LABELS, prefix=PREFIX), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full_ids, full_mask = pad_right([PREFIX + s for s in SUFFIXES], pad_id=0)
    full = torch.nn.functional.cross_entropy(answer_logits(model, full_ids, full_mask, LABELS), labels)
    full.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    embed = grads["model.embed_tokens.weight"]
    assert embed[PREFIX].abs().sum(dim=1).min() > 0  # every prefix token's embedding gets gradient
    # A PrefixCache is a constant: prefix-only embeddings get no gradient through it.
    model.zero_grad()
    cached = answer_logits(model, ids, mask, LABELS, prefix=build_prefix_cache(model, PREFIX))
    torch.nn.functional.cross_entropy(cached, labels).backward()
    assert model.model.embed_tokens.weight.grad[PREFIX].abs().max() == 0


def test_reused_prefix_cache_is_not_mutated(model):
    cache = build_prefix_cache(model, PREFIX)
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    assert cache.length == len(PREFIX) and cache.layers[0][0].shape[0] == 1
    ids, mask = pad_right(SUFFIXES, pad_id=0)
    first = answer_logits(model, ids, mask, LABELS, prefix=cache)
    small_ids, small_mask = pad_right(SUFFIXES[2:], pad_id=0)
    answer_logits(model, small_ids, small_mask, LABELS, prefix=cache)  # a different batch size in between
    second = answer_logits(model, ids, mask, LABELS, prefix=cache)
    assert torch.equal(first, second)
    for (k, v), (k0, v0) in zip(cache.layers, before, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0) and k.shape[-2] == len(PREFIX)


def test_left_padding_is_rejected(model):
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"rows \[0\] are not right-padded"):
        answer_logits(model, ids, mask, LABELS)
