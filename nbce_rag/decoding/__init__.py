"""Decoding: NBCE over the kept passages, one model row per passage, fused token by token.

The story: ``nbce`` holds the maths (poolings, the fusion rule, attribution); ``rows`` checks
a request's input and builds its rows (one per passage or window, plus the no-passage row) and
the row groups that share a KV cache; ``decoder`` is ``NBCEDecoder`` (load, ``generate`` /
``stream``) and its step API (start, prefill, advance, forward, finish on a ``DecodeState``);
``kvlayout`` lays out a group's KV cache, ``kvcache`` reuses passages' keys and values across
questions (namespaces, RAM LRU, prefill plans, filling ahead of time; ``kvstore`` is the
token-prefix index and the on-disk store); ``scheduler`` decodes many requests in shared
forwards; ``sampling`` and ``static_decode`` are the post-fusion processing and the
static-cache (optionally compiled) decode; ``scoring`` gives unscored passages a relevance
score (canonical cosine, and ``log p(question | passage)`` from the prefill).

May import: ``nbce_rag.types``, ``config``, ``errors``, ``files``, ``models`` and ``retrieval``
(the encoder and ``rescore`` for scoring, ``chunking`` for long passages, ``index`` for
``NBCEDecoder.cache_passages``); never
``filtering``, the pipeline or an integration.
"""
