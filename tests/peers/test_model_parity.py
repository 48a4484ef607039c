"""Our decoder against transformers on tiny random models of every architecture.

Tolerance: fp32 logits within 1e-4 max abs difference. Both sides run the same fp32 math in a different order
(fused vs separate ops, SDPA vs eager attention), which leaves differences around 1e-6 here; 1e-4 leaves room
for BLAS differences across machines while still catching any real error (a wrong bias or norm moves logits by
1e-2 or more).
"""

import pytest
import torch

from qwenkit.checkpoint.loader import load_weights
from tests.paged_steps import PagedSequence
from tests.tiny_models import TINY_CONFIGS, save_transformers_model

pytestmark = pytest.mark.peer

PROMPT_LEN = 64
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_transformers_model(request.param, folder)
    ours, _ = load_weights(folder)
    return reference, ours


def prompt(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (1, PROMPT_LEN), generator=g)


def test_logits_match_transformers(pair):
    reference, ours = pair
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff:.2e}"


def test_greedy_tokens_through_kv_cache_match_transformers(pair):
    reference, ours = pair
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        expected = reference.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS, pad_token_id=0
        )[0, PROMPT_LEN:].tolist()
        # The engine's paged cache, float32 as the reference keeps it, its slots in reverse order
        sequence = PagedSequence(ours, PROMPT_LEN + NEW_TOKENS, torch.float32,
                                 slots=torch.arange(PROMPT_LEN + NEW_TOKENS).flip(0))
        logits = sequence(ids[0].tolist())
        got = []
        for _ in range(NEW_TOKENS):
            token = int(logits.argmax(-1))
            got.append(token)
            logits = sequence([token], generated=True)
    assert got == expected
