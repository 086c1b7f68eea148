"""Tokenize documents and pack them into fixed-length contexts.

BOS convention (the paper's and SAELens' default): documents are tokenized without special
tokens, in batches of ``doc_batch``, and concatenated into one token stream with
``separator_token_id`` (default: the BOS id) *between* consecutive documents. The stream is cut
into windows of ``context_size - 1`` tokens and each window is preceded by BOS, so every context
starts with BOS. With ``prepend_bos=False`` windows are ``context_size`` tokens and nothing is
prepended. The trailing partial window is dropped; no other token is lost or reordered::

    doc1 SEP doc2 SEP doc3 ...  ->  [BOS w0] [BOS w1] [BOS w2] ...   (|w_i| = context_size - 1)

Evaluations read :func:`draw_contexts`: contexts drawn at random from a pool of the corpus, each with the
document its text starts in (:func:`context_documents`), so that a metric's few hundred contexts come from
many documents and its intervals can resample whole documents.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.errors import CorpusError
from saelab.utils.words import plural

TokenizeFn = Callable[[list[str]], list[list[int]]]


def hf_tokenize_fn(tokenizer: Any) -> TokenizeFn:
    """Wrap a Hugging Face tokenizer as ``texts -> token id lists`` (no special tokens added)."""

    def tokenize(texts: list[str]) -> list[list[int]]:
        # verbose=False: long documents exceed model_max_length by design; we cut them ourselves.
        enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return enc["input_ids"]

    return tokenize


def _as_tokenize_fn(tokenize: Any) -> TokenizeFn:
    # A Hugging Face tokenizer is callable too, but returns a BatchEncoding, not lists of ids.
    if hasattr(tokenize, "convert_tokens_to_ids"):
        return hf_tokenize_fn(tokenize)
    if not callable(tokenize):
        raise TypeError(f"tokenize must be a callable texts -> token id lists, got {type(tokenize).__name__}")
    return tokenize


def pack_contexts(
    texts: Iterable[str],
    tokenize: TokenizeFn,
    context_size: int,
    *,
    bos_token_id: int | None,
    prepend_bos: bool = True,
    separator_token_id: int | None = None,
    max_contexts: int | None = None,
    doc_batch: int = 64,
) -> Iterator[torch.Tensor]:
    """Yield 1-D LongTensors of exactly ``context_size`` tokens (see the module docstring).

    ``tokenize`` maps a list of texts to a list of token id lists, without special tokens
    (a Hugging Face tokenizer is accepted and wrapped with :func:`hf_tokenize_fn`).
    ``separator_token_id`` defaults to ``bos_token_id``; when both are None documents are
    simply concatenated. Contexts yielded together may share storage; clone one to keep it
    apart from its neighbours.
    """
    tokenize = _as_tokenize_fn(tokenize)
    if prepend_bos and bos_token_id is None:
        raise ValueError("prepend_bos=True needs a bos_token_id (pass prepend_bos=False for models without BOS)")
    min_size = 2 if prepend_bos else 1
    if context_size < min_size:
        raise ValueError(f"context_size must be >= {min_size}, got {context_size}")
    if doc_batch < 1:
        raise ValueError(f"doc_batch must be >= 1, got {doc_batch}")
    if max_contexts is not None and max_contexts <= 0:
        return
    sep = bos_token_id if separator_token_id is None else separator_token_id
    window = context_size - 1 if prepend_bos else context_size

    carry = np.zeros(0, dtype=np.int64)  # tokens waiting for a full window
    n_out = 0
    first_doc = True
    for docs in _chunks(texts, doc_batch):
        flat: list[int] = []
        for ids in tokenize(docs):
            if sep is not None and not first_doc:
                flat.append(sep)
            flat.extend(ids)
            first_doc = False
        stream = np.concatenate([carry, np.asarray(flat, dtype=np.int64)])
        n_win = len(stream) // window
        if max_contexts is not None:
            n_win = min(n_win, max_contexts - n_out)
        carry = stream[n_win * window :]
        if n_win == 0:
            continue
        ctx_NT = torch.from_numpy(stream[: n_win * window].reshape(n_win, window))
        if prepend_bos:
            bos_N1 = torch.full((n_win, 1), bos_token_id, dtype=torch.long)
            ctx_NT = torch.cat([bos_N1, ctx_NT], dim=1)
        yield from ctx_NT.unbind(0)
        n_out += n_win
        if max_contexts is not None and n_out >= max_contexts:
            return


def sample_contexts(contexts: Iterable[torch.Tensor], n_contexts: int, pool_contexts: int, *,
                    seed: int = 0, progress: bool = False) -> Iterator[torch.Tensor]:
    """``n_contexts`` windows drawn at random (seeded) from the first ``pool_contexts`` of a stream.

    Packed windows follow the corpus, so a harvest much smaller than the corpus would otherwise
    come from its first few documents: on Wikipedia, 262,144 tokens are about 65 articles, and an
    SAE trained on them reconstructs other articles worse. Drawing from a larger pool spreads the
    windows over many documents. The draw keeps corpus order (a shuffle buffer follows anyway)
    and is deterministic, so an interrupted harvest resumes with the same windows. A pool smaller
    than ``n_contexts`` yields every window it has. ``progress``: a bar counting the pool's contexts
    (tokenizing a large pool takes a while before the first window is yielded).
    """
    if n_contexts <= 0:
        return
    pool_contexts = max(pool_contexts, n_contexts)
    pool = []
    with tqdm(total=pool_contexts, unit="ctx", unit_scale=True, desc="context pool", disable=not progress) as bar:
        for ctx in contexts:
            pool.append(ctx.clone())  # packed contexts share storage with their neighbours
            bar.update(1)
            if len(pool) >= pool_contexts:
                break
    if len(pool) <= n_contexts:
        yield from pool
        return
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n_contexts].sort().values
    for i in pick.tolist():
        yield pool[i]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def batched(contexts: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack 1-D tensors into [batch_size, T] batches; the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(contexts, torch.Tensor) and contexts.dim() == 2:
        yield from contexts.split(batch_size)
        return
    for chunk in _chunks(contexts, batch_size):
        yield torch.stack(chunk)


def token_contexts(
    source: str | os.PathLike | Iterable[str],
    tokenizer_fn: TokenizeFn,
    context_size: int,
    n_tokens: int | None = None,
    n_contexts: int | None = None,
    *,
    bos_token_id: int | None,
    prepend_bos: bool = True,
    separator_token_id: int | None = None,
    text_field: str = "text",
    split: str = "train",
    limit_docs: int | None = None,
    doc_batch: int = 64,
    setting: str | None = "context_size",
    texts: Iterable[str] | None = None,
    min_contexts: int | None = None,
) -> torch.Tensor:
    """Pack a whole (small) token set into one LongTensor [N, context_size], e.g. an eval set.

    ``source`` is anything :func:`~saelab.data.text.iter_texts` reads, or an iterable of texts.
    ``texts``: the documents of ``source`` when the caller has opened it (read instead of opening it
    again; ``source`` names it in errors).
    Give at most one of ``n_tokens`` (rounded up to whole contexts) and ``n_contexts``; with
    neither, the whole source is packed. A source too small for the request (for ``min_contexts`` when given:
    ``n_contexts`` is then the most read) raises CorpusError;
    one shorter than a context names ``setting``, the setting that chose ``context_size`` (None: one the
    caller cannot change, left out).
    """
    from saelab.data.text import iter_texts

    if n_tokens is not None and n_contexts is not None:
        raise ValueError("give n_tokens or n_contexts, not both")
    if n_tokens is not None:
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        n_contexts = math.ceil(n_tokens / context_size)
    if n_contexts is not None and n_contexts <= 0:
        raise ValueError(f"n_contexts must be positive, got {n_contexts}")
    is_source = isinstance(source, (str, os.PathLike))
    if texts is None:
        texts = iter_texts(source, text_field=text_field, split=split, limit_docs=limit_docs) if is_source else source
    tokenize, counted = _as_tokenize_fn(tokenizer_fn), [0, 0]  # tokens and documents, for a corpus too short

    def counting(docs: list[str]) -> list[list[int]]:
        ids = tokenize(docs)
        counted[0], counted[1] = counted[0] + sum(map(len, ids)), counted[1] + len(ids)
        return ids

    rows = list(
        pack_contexts(
            texts,
            counting,
            context_size,
            bos_token_id=bos_token_id,
            prepend_bos=prepend_bos,
            separator_token_id=separator_token_id,
            max_contexts=n_contexts,
            doc_batch=doc_batch,
        )
    )
    name = repr(os.fspath(source)) if is_source else "the given texts"
    sep = bos_token_id if separator_token_id is None else separator_token_id
    stream = counted[0] + (max(counted[1] - 1, 0) if sep is not None else 0)  # separators between documents
    if not rows:
        raise _shorter_than_a_context(name, stream, context_size, prepend_bos, setting)
    needed = n_contexts if min_contexts is None else min_contexts
    if needed is not None and len(rows) < needed:
        err = CorpusError(f"corpus {name} gave only {len(rows)} {plural(len(rows), 'context')} of {context_size} "
                          f"{plural(context_size, 'token')}; {needed} requested")
        err.contexts, err.tokens = len(rows), stream  # for callers that name their own option's maximum
        raise err
    return torch.stack(rows)


def _shorter_than_a_context(name: str, tokens: int, context_size: int, prepend_bos: bool,
                            setting: str | None) -> CorpusError:
    """The refusal of a corpus of ``tokens`` tokens that fills no context: what one takes, and the two ways
    out (more text, or a context it fills, named as ``setting``)."""
    window = context_size - 1 if prepend_bos else context_size
    text = f"{window:,} {plural(window, 'token')}"
    takes = f"BOS and {text} of text" if prepend_bos else f"{text} of text"
    err = CorpusError(f"corpus {name} holds {tokens:,} {plural(tokens, 'token')}, too few for one context of "
                      f"{context_size:,} ({takes}); expected a corpus of at least {text}"
                      + (f", or {setting} <= {tokens + (1 if prepend_bos else 0)}" if setting else ""))
    err.contexts = 0  # for callers that name their own option's maximum
    return err


def context_documents(tokens_NT: torch.Tensor, separator_token_id: int | None, prepend_bos: bool = True
                      ) -> torch.Tensor | None:
    """The document each of consecutively packed contexts starts in ``[N]`` (0 = the first document
    read): the separators in the windows before it, one more when its window opens on a separator.
    None without a separator: the stream does not tell its documents apart."""
    if separator_token_id is None:
        return None
    is_sep_NT = (tokens_NT[:, 1:] if prepend_bos else tokens_NT) == separator_token_id
    per_ctx = is_sep_NT.sum(1)
    return per_ctx.cumsum(0) - per_ctx + is_sep_NT[:, 0].long()


def token_documents(tokens_NT: torch.Tensor, documents_N: torch.Tensor, separator_token_id: int | None,
                    prepend_bos: bool = True) -> torch.Tensor:
    """The document of every token ``[N, T]``, given each context's (:func:`context_documents`): a separator
    belongs to the document it opens; the BOS that packing puts first, to the context's first document.
    Without a separator every token is its context's document."""
    if separator_token_id is None:
        return documents_N.cpu()[:, None].expand(tuple(tokens_NT.shape)).clone()
    is_sep_NT = (tokens_NT[:, 1:] if prepend_bos else tokens_NT).cpu() == separator_token_id
    docs_NT = documents_N.cpu()[:, None] - is_sep_NT[:, :1].long() + is_sep_NT.long().cumsum(1)
    return torch.cat([docs_NT[:, :1], docs_NT], dim=1) if prepend_bos else docs_NT


@dataclass
class DrawnContexts:
    """Contexts drawn from a corpus (:func:`draw_contexts`)."""

    tokens: torch.Tensor
    """``[N, T]`` in the order drawn: every prefix is itself a draw across the pool, so a metric that
    reads the first ``n`` reads contexts of many documents."""
    documents: torch.Tensor | None
    """``[N]`` the document each context's text starts in (an index in the corpus); None when the
    corpus has no separator between documents."""
    index: torch.Tensor
    """``[N]`` each context's place in the corpus's stream of contexts."""

    def head(self, n: int) -> "DrawnContexts":
        """The first ``n`` contexts drawn."""
        return self._pick(slice(n))

    def in_corpus_order(self) -> "DrawnContexts":
        """The same contexts in the corpus's order: neighbours in the stream are neighbours here (text that
        runs across a cut between contexts can be followed)."""
        return self._pick(self.index.argsort())

    def _pick(self, rows) -> "DrawnContexts":
        return DrawnContexts(self.tokens[rows], None if self.documents is None else self.documents[rows],
                             self.index[rows])


def pooled_contexts(n_contexts: int, pool_tokens: int, context_size: int) -> int:
    """How many contexts :func:`draw_contexts` draws ``n_contexts`` among (fewer where the source is shorter):
    two draws of one source and pool pick the same first contexts where this is the same for both."""
    return max(n_contexts, pool_tokens // context_size)


def draw_contexts(source: str | os.PathLike | Iterable[str], tokenizer_fn: TokenizeFn, context_size: int,
                  n_contexts: int, *, pool_tokens: int, bos_token_id: int | None, prepend_bos: bool = True,
                  separator_token_id: int | None = None, setting: str | None = "context_size",
                  seed: int = 0) -> DrawnContexts:
    """``n_contexts`` contexts drawn at random (seeded) from the first ``pool_tokens`` tokens of ``source``
    (all of it when shorter), in the random order; ``pool_tokens`` 0: the first ``n_contexts``, in order.

    Consecutive contexts come from a few documents (on Wikipedia, 64 contexts of 64 tokens are about
    one article), so a metric read on them measures those documents, and an interval that resamples
    the contexts is too narrow. Too short a source raises :func:`token_contexts`'s CorpusError for
    ``n_contexts``."""
    n_pool = pooled_contexts(n_contexts, pool_tokens, context_size)
    pool = token_contexts(source, tokenizer_fn, context_size, n_contexts=n_pool, min_contexts=n_contexts,
                          bos_token_id=bos_token_id, prepend_bos=prepend_bos, separator_token_id=separator_token_id,
                          setting=setting)
    sep = bos_token_id if separator_token_id is None else separator_token_id
    documents = context_documents(pool, sep, prepend_bos)
    pick = (torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed)) if pool_tokens
            else torch.arange(pool.shape[0]))[:n_contexts]
    return DrawnContexts(pool[pick], None if documents is None else documents[pick], pick)
