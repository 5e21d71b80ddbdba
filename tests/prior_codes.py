"""Tiny code shards for the prior's tests: random codes written by the DATA stage's shard writer."""

from __future__ import annotations

from nextscale.codes import write_synthetic_shards
from nextscale.tokenize.loader import load_tokenizer


def write_codes(out: str, tokenizer_url: str, *, num_samples: int, views: int, seed: int,
                num_classes: int = 10, samples_per_shard: int = 16) -> str:
    """Random uint16 codes (K views, L tokens of the tokenizer) + labels i % num_classes; returns ``out``.

    The manifest records the tokenizer file as `nextscale tokenize` does (url, kind, sha256, config).
    """
    vqvae, ident = load_tokenizer(tokenizer_url)
    vq = vqvae.cfg
    write_synthetic_shards(out, num_samples=num_samples, num_tokens=vq.num_tokens, vocab_size=vq.vocab_size,
                           views=views, samples_per_shard=samples_per_shard, num_classes=num_classes, seed=seed,
                           patch_nums=vq.patch_nums, image_size=vq.image_size, tokenizer=ident)
    return out
