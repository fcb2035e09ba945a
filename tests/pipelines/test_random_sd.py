"""Random SD-family parts: the sizes, the LCM variant, and the offline tokenizer fallback."""

import pytest
from fmboost.models.assets import SHARED_ENV
from fmboost.pipelines.random_sd import load_tokenizer, random_sd_components


def test_random_sd_components_sizes():
    with pytest.raises(ValueError, match="size must be one of"):
        random_sd_components("huge")
    parts = random_sd_components("tiny", lcm=True)
    assert parts["unet"].config.time_cond_proj_dim == 256 and type(parts["scheduler"]).__name__ == "LCMScheduler"
    assert parts["text_encoder"].config.vocab_size >= len(parts["tokenizer"])


def test_load_tokenizer_falls_back_to_a_toy_vocabulary_without_the_shared_one(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))  # a shared folder without tokenizers/clip
    tokenizer = load_tokenizer()
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and ids[1:4] == tokenizer.convert_tokens_to_ids(["a</w>", "c", "a"])
