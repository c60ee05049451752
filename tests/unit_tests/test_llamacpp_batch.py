"""LlamaCpp's exact prefix reuse: which KV a later prompt may keep (no model needed).

llama.cpp computes a token differently by the batch (``llama_decode``) it is in: its
kernels choose their path and tiling by the number of tokens. A reused prefix gives a
cold call's answer when every reused token was computed in the very chunk (same
tokens, same positions, same KV before it) that a cold prefill of the new prompt
would compute it in. These tests check the plan keeps that, with no assumption about
the kernels.
"""

from __future__ import annotations

import random

import pytest

from langchain_localllms.engines.llamacpp.batching import PROBE_EVERY, Batcher
from langchain_localllms.engines.llamacpp.prefix import (
    canonical_length,
    prefill_chunks,
    reusable_length,
)


def test_chunks_are_aligned_and_cover_the_range():
    assert prefill_chunks(0, 400, 256) == [(0, 256), (256, 400)]
    # two chunks or more: the last, partial one is cut again at a multiple of 64
    assert prefill_chunks(0, 600, 256) == [(0, 256), (256, 512), (512, 576), (576, 600)]
    assert prefill_chunks(300, 600, 256) == [(300, 512), (512, 576), (576, 600)]
    assert prefill_chunks(0, 576, 256) == [(0, 256), (256, 512), (512, 576)]
    assert prefill_chunks(5, 5, 256) == []
    assert prefill_chunks(0, 3, 1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="chunk"):
        prefill_chunks(0, 3, 0)


def test_reuse_is_in_whole_chunks_before_the_first_difference():
    tokens = list(range(1100))
    assert reusable_length(tokens[:1024], tokens, 256) == 1024
    assert reusable_length(tokens[:700] + [-1] * 400, tokens, 256) == 512
    assert reusable_length(tokens[:200], tokens, 256) == 0
    assert reusable_length([], tokens, 256) == 0


def test_at_least_one_token_is_left_to_evaluate():
    tokens = list(range(512))
    assert reusable_length(tokens, tokens, 256) == 256  # 512 would leave nothing
    assert reusable_length(tokens, tokens[:257], 256) == 256
    assert reusable_length(tokens, tokens[:256], 256) == 0


def test_reuse_goes_to_the_cut_in_the_last_chunk_where_both_prompts_make_it():
    few_shot = list(range(995))  # then two questions: 1,007 and 1,009 tokens
    first, second = [*few_shot, *range(-12, 0)], [*few_shot, *range(-30, -16)]
    cached = first[: canonical_length(len(first), 256)]
    assert len(cached) == 960  # 768 + 3 * 64
    assert reusable_length(cached, second, 256) == 960
    # a prompt that ends past 1,024 evaluates 768..1023 in one piece: 768 only
    assert reusable_length(cached, [*few_shot, *range(-40, 0)], 256) == 768
    # one that ends at 930 cuts at 896: the piece 768..959 is not one of its own
    assert reusable_length(cached, [*few_shot[:920], *range(-10, 0)], 256) == 768


def test_only_whole_pieces_of_a_prompt_are_kept_for_later():
    assert canonical_length(1100, 256) == 1088  # 1088..1099 is a piece of its own size
    assert canonical_length(1024, 256) == 1024
    assert canonical_length(960, 256) == 960
    assert canonical_length(400, 256) == 256  # one chunk and a part: no second cut
    assert canonical_length(100, 256) == 0


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_every_reused_token_was_computed_in_the_chunk_a_cold_prefill_uses(chunk):
    rng = random.Random(chunk)
    base = [rng.randrange(50) for _ in range(400)]
    cached: list[int] = []
    # Per position in the cache: (token, the chunk it was computed in). A token's KV
    # depends on its chunk and on the KV before it, so equal chunks all the way
    # from the start mean equal KV.
    computed: list[tuple[int, tuple[int, int]]] = []
    for _ in range(300):
        n = rng.randrange(1, 300)
        share = rng.randrange(0, n + 1)
        tokens = base[:share] + [rng.randrange(50, 99) for _ in range(n - share)]
        cold = {i: c for c in prefill_chunks(0, n, chunk) for i in range(*c)}
        keep = reusable_length(cached, tokens, chunk)
        assert 0 <= keep < n
        assert tokens[:keep] == cached[:keep]
        warm = {i: c for c in prefill_chunks(keep, n, chunk) for i in range(*c)}
        now = [computed[i] if i < keep else (tokens[i], warm[i]) for i in range(n)]
        assert now == [(tokens[i], cold[i]) for i in range(n)], (keep, n)
        computed = now
        cached = tokens[: canonical_length(n, chunk)]


def test_rows_slower_together_than_one_by_one_are_decoded_one_by_one():
    batcher = Batcher(engine=None)  # the cost bookkeeping needs no model
    assert not batcher.slower_together(2)  # nothing measured yet: decode together
    for width, seconds in ((1, 0.010), (2, 0.023), (4, 0.032)):
        batcher.note_cost(width, 1.0)  # a width's first step (llama.cpp's setup) is not counted
        for _ in range(3):
            batcher.note_cost(width, seconds)
    # 2 rows took longer than 2 x 1 row; 4 rows less than 4 x 1 row.
    split = [batcher.slower_together(2) for _ in range(PROBE_EVERY)]
    assert split.count(False) == 1  # together once in PROBE_EVERY steps, to measure anew
    assert not batcher.slower_together(4)
    assert not batcher.slower_together(1)
    for _ in range(20):  # the average follows what the steps take now
        batcher.note_cost(2, 0.015)
    assert not batcher.slower_together(2)
