"""Passage-affinity routing for the decoder replicas (Ray Serve's request-router API).

An NBCE request is one row per passage, and a decoder replica keeps the keys/values of every
passage row it prefilled in its passage KV cache. So the replica that already served a
request's passages answers it for the cost of the question alone; a round-robin or
power-of-two router spreads the same documents over every replica and each cache sees 1/N
of the repeats.

:class:`PassageAffinityRouter` (a :class:`ray.serve.request_router.RequestRouter`):

1. Each passage votes for one replica by **rendezvous (highest random weight) hashing** of its
   key (:func:`passage_key`) with the replica ids; the replica with most votes is preferred
   (ties: the rendezvous winner of the whole passage set). Rendezvous hashing needs no shared
   state: every ingress replica computes the same choice, and when a replica leaves (or Ray
   restarts it under a new id) only the passages it owned move.
2. **Load first**, as ``PrefixCacheAffinityRouter``'s ``imbalanced_threshold``: when the
   preferred replica's ongoing requests exceed the least loaded one's by more than
   ``imbalanced_threshold``, the request goes to the least loaded replica instead (then the
   others, by Ray's own probing). A full replica (``max_ongoing_requests``) is skipped by Ray.
3. Requests without passages (closed-book) have no preference: least loaded.

The request's keys travel in its payload (``affinity``: a list of :func:`passage_key`),
computed by the ingress after retrieval and filtering, so index-backed requests and
``documents`` requests route the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any, Iterable, List, Optional, Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

__all__ = ["PassageAffinityRouter", "passage_key", "rendezvous_owner", "request_keys"]

logger = logging.getLogger("nbce_rag.integrations.server")


def passage_key(text: str, system_prompt: Optional[str] = None) -> str:
    """The key of one passage row's cacheable prefix: a digest of what the passage KV cache
    stores for it (the template prefix with the system prompt, then the passage text; the
    cache itself keys on the token ids of exactly that prefix, which the ingress does not
    tokenize). Equal keys -> the same cache entry on a replica that served it."""
    h = hashlib.blake2b(digest_size=12)
    h.update((system_prompt or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica}".encode(), digest_size=8).digest(), "big")


def rendezvous_owner(keys: Sequence[str], replicas: Sequence[str]) -> Optional[str]:
    """The replica (by id) that ``keys`` (a request's passages) prefer: most passage votes,
    ties broken by the rendezvous winner of the whole set. ``None`` without keys or replicas."""
    if not keys or not replicas:
        return None
    votes: Counter = Counter(max(replicas, key=lambda r: _weight(k, r)) for k in keys)
    whole = "|".join(sorted(keys))
    return max(replicas, key=lambda r: (votes[r], _weight(whole, r)))


def request_keys(args: Iterable[Any]) -> List[str]:
    """The affinity keys of a pending request (its first dict argument's ``affinity``)."""
    for a in args or ():
        if isinstance(a, dict) and "affinity" in a:
            return [str(k) for k in a.get("affinity") or ()]
    return []


class PassageAffinityRouter(RequestRouter):
    """Send a decode request to the replica whose passage KV cache holds its passages (see
    the module docstring). ``request_router_kwargs``: ``imbalanced_threshold`` (ongoing
    requests the preferred replica may have above the least loaded one; default 2)."""

    def initialize_state(self, imbalanced_threshold: float = 2, **kwargs: Any) -> None:
        if not imbalanced_threshold >= 0:
            raise ValueError(f"imbalanced_threshold must be >= 0 (got {imbalanced_threshold})")
        self._imbalanced_threshold = float(imbalanced_threshold)
        self.preferred_routed = 0  #: requests sent to their preferred replica
        self.rebalanced = 0  #: requests sent elsewhere because the preferred one was loaded

    async def _queue_lens(self, replicas: List[RunningReplica]) -> dict:
        lens, missing = {}, []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id)
            if q is None:
                missing.append(r)
            else:
                lens[r.replica_id] = q
        if missing:
            for r, q in await self._probe_queue_lens(missing, 0):
                if q is not None:
                    lens[r.replica_id] = q
        return lens

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        keys = request_keys(pending_request.args) if pending_request is not None else []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        owner = rendezvous_owner(keys, sorted(by_id))
        if owner is None:
            return [list(candidate_replicas)]  # Ray picks the least loaded of them
        preferred = by_id[owner]
        others = [r for r in candidate_replicas if r is not preferred]
        if others:
            lens = await self._queue_lens(candidate_replicas)
            mine = lens.get(preferred.replica_id)
            low = min(lens.values()) if lens else None
            if mine is not None and low is not None and mine - low > self._imbalanced_threshold:
                self.rebalanced += 1
                return [others, [preferred]]
        self.preferred_routed += 1
        return [[preferred], others] if others else [[preferred]]
