"""Data: text sources, token packing, activation harvest and the on-disk activation cache.

    texts    = iter_texts("corpus.jsonl.xz")                         # or default_corpus("train")
    contexts = pack_contexts(texts, hf_tokenize_fn(tok), 64, bos_token_id=tok.bos_token_id)
    stream   = ActivationStream(model, "blocks.8.hook_resid_post", contexts, batch_size=4096)
    cache    = write_activation_cache(stream, "acts/", meta={"hook": "blocks.8.hook_resid_post"})
    for acts_BD in cache.batches(4096, seed=0): ...
"""

from saelab.data.cache import (
    ActivationCache,
    ActivationCacheError,
    IncompleteCacheError,
    cache_is_complete,
    check_disk_room,
    cache_rows_written,
    note_unfinished_overwrite,
    reusable_cache,
    write_activation_cache,
)
from saelab.data.harvest import ActivationModel, ActivationStream, StreamConfig
from saelab.data.text import (TextsReadOnce, corpus_files_key, corpus_identity, corpus_name, default_corpus, iter_texts,
                              resolve_corpus, shipped_data_dir)
from saelab.data.tokens import (DrawnContexts, batched, context_documents, draw_contexts, hf_tokenize_fn, pack_contexts,
                                pooled_contexts, sample_contexts, token_contexts, token_documents)

__all__ = [
    "ActivationCache",
    "ActivationCacheError",
    "ActivationModel",
    "ActivationStream",
    "batched",
    "cache_is_complete",
    "check_disk_room",
    "context_documents",
    "cache_rows_written",
    "corpus_files_key",
    "corpus_identity",
    "corpus_name",
    "default_corpus",
    "draw_contexts",
    "pooled_contexts",
    "DrawnContexts",
    "hf_tokenize_fn",
    "IncompleteCacheError",
    "iter_texts",
    "note_unfinished_overwrite",
    "pack_contexts",
    "resolve_corpus",
    "reusable_cache",
    "sample_contexts",
    "shipped_data_dir",
    "StreamConfig",
    "TextsReadOnce",
    "token_contexts",
    "token_documents",
    "write_activation_cache",
]
