"""The demo corpus: raw bytes (the default) and the byte-level BPE option."""

import numpy as np

from nemo_lossfree.apps.demo.corpus import load_corpus


def test_bpe_tokenizes_both_splits_within_the_vocabulary_and_caches_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    raw = load_corpus(max_bytes=1 << 20)
    bpe = load_corpus(max_bytes=1 << 20, tokenizer="bpe", vocab_size=512)
    assert bpe.vocab_size == 512
    for split in ("train", "val"):
        ids = getattr(bpe, f"{split}_tokens")
        assert ids.max() < 512 and ids.min() >= 0
        # Merges shorten the text: well under one token per byte.
        assert len(ids) < 0.8 * len(getattr(raw, f"{split}_tokens"))
    cached = list((tmp_path / "nemo-lossfree" / "bpe").glob("*.npz"))
    assert len(cached) == 1
    again = load_corpus(max_bytes=1 << 20, tokenizer="bpe", vocab_size=512)
    np.testing.assert_array_equal(again.train_tokens, bpe.train_tokens)
    other = load_corpus(max_bytes=1 << 20, tokenizer="bpe", vocab_size=384)
    assert other.train_tokens.max() < 384
    assert len(list((tmp_path / "nemo-lossfree" / "bpe").glob("*.npz"))) == 2
