"""Prompt batches are a pure function of (seed, iteration); prompts are encoded with the chat template."""

from stages.generate import batch_indices, encode_prompt


def test_each_pass_is_a_permutation_and_batches_are_reproducible():
    n, per = 10, 4
    order = [i for it in range(1, 6) for i in batch_indices(n, per, it, seed=3, shuffle=True)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # a new shuffle per pass
    assert batch_indices(n, per, 2, seed=3, shuffle=True) == order[4:8]
    assert batch_indices(n, per, 2, seed=4, shuffle=True) != order[4:8]
    assert batch_indices(n, per, 3, seed=0, shuffle=False) == [8, 9, 0, 1]


def test_encode_prompt_applies_template_and_truncates_from_the_left(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, truncated = encode_prompt(tok, "What is 1+2?", chat=True, max_tokens=128)
    text = tok.decode(ids)
    assert not truncated and "What is 1+2?" in text and text.rstrip().endswith("assistant")
    short, truncated = encode_prompt(tok, "What is 1+2?", chat=True, max_tokens=5)
    assert truncated and short == ids[-5:]
