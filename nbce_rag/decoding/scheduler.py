"""Decode many requests together: a step scheduler over the decoder's step API.

An NBCE request is already a batch of rows (one per passage, plus the no-passage row) whose
only coupling is the per-token fusion, so the rows of several requests can share one forward.
:class:`StepScheduler` keeps each request's rows in step with each other (a request is a
*group* that always steps whole), runs every active group's rows in as few forwards as the
row budget allows (left-padded caches, per-row positions, each group's own token fed to its
rows), fuses per group and hands each request its own events. It has no threads and no HTTP:
the server's model worker drives it, and so does :meth:`RAGPipeline.batch` for offline jobs.

Scheduling policy (one :meth:`StepScheduler.step` = one iteration)
-----------------------------------------------------------------
1. **Admission** between steps, first come first served, while fewer than ``max_active``
   requests are active; the rest wait in :attr:`StepScheduler.waiting`.
2. **Chunked prefill**: each iteration prefills at most ``prefill_tokens`` padded tokens (chunks
   of up to ``batch_rows`` rows; at least one row), shortest remaining prefill first -- short
   requests get their first token soon -- except that the oldest request still prefilling goes
   first when it got no chunk in the previous iteration, so a long prefill advances at least
   every other iteration. A long prefill thus delays the others' next token by about one
   budget per iteration, never by its whole prefill, and a cancelled or timed-out request
   leaves after the chunk in progress. A request's first token is picked as soon as its last
   chunk is done.
3. **Decode step** with a row budget: requests that fit in a lane (``lane_rows`` rows, default
   the decoder's ``decode_rows``) are packed together into shared lanes (one forward each);
   a larger request keeps its own decode groups. Lanes and large requests are *units*; each
   iteration takes units round-robin, starting with the one skipped longest, until the next
   would pass ``step_rows`` rows (at least one unit always runs). With only small requests
   every unit steps every iteration; a request with hundreds of passages (more rows than the
   budget) steps alone in every other iteration, so it neither starves nor is starved.
4. **Leaving**: a request that finished (EOS, stop string, ``max_tokens``) or was removed
   (cancelled, timed out, failed) leaves at once; its rows are cut out of its lane's cache and
   all-padding columns on the left are trimmed.

Every request keeps its own options (stop, max_new_tokens, sampling and seed, pooling): tokens
are those of the request decoded alone (up to float rounding in the padded attention; fp32
tests check token identity).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import torch

from nbce_rag.decoding.decoder import DecodeState, NBCEDecoder
from nbce_rag.decoding.kvlayout import is_plain, select_rows
from nbce_rag.decoding.rows import Group, merge_run
from nbce_rag.types import StreamEvent

logger = logging.getLogger(__name__)

__all__ = ["SchedulerConfig", "StepScheduler", "DecodeBatch", "StepResult"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of :class:`StepScheduler` (see the module docstring for the policy)."""

    max_active: int = 32  #: requests decoded together; more wait for admission
    step_rows: int = 256  #: row budget of one decode iteration (a larger request steps alone)
    prefill_tokens: int = 2048  #: padded tokens per prefill chunk (at least one row)
    lane_rows: Optional[int] = None  #: rows per shared forward (None: the decoder's decode_rows)

    def __post_init__(self) -> None:
        for name in ("max_active", "step_rows", "prefill_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if self.lane_rows is not None and self.lane_rows < 1:
            raise ValueError(f"SchedulerConfig.lane_rows must be >= 1 (got {self.lane_rows})")


@dataclass
class StepResult:
    """What one iteration did for one request: its new events (the last carries the Answer
    when ``state.done``), or the error that ended it (``events`` then empty)."""

    state: DecodeState
    events: List[StreamEvent]
    error: Optional[BaseException] = None


class _Unit:
    """Rows that step in one go: a shared lane (one group, rows of several small requests, in
    member order) or one large request's own decode groups."""

    __slots__ = ("groups", "members", "shared")

    def __init__(self, groups: List[Group], members: List[DecodeState], shared: bool):
        self.groups = groups
        self.members = members
        self.shared = shared

    @property
    def rows(self) -> int:
        return sum(m.n_rows for m in self.members)


class DecodeBatch:
    """The prefilled requests being decoded, laid out in units (see the module docstring).

    :meth:`add` a prefilled :class:`DecodeState` whose ``token`` is pending, :meth:`step` to
    feed every selected state's token to its rows (one forward per lane), :meth:`remove` to
    compact a state out. :meth:`step` sets ``state.logits``; the caller then calls
    :meth:`NBCEDecoder.advance`."""

    def __init__(self, decoder: NBCEDecoder, lane_rows: Optional[int] = None):
        self.decoder = decoder
        self.lane_rows = lane_rows or decoder.config.decode_rows
        self.units: List[_Unit] = []
        self._where: Dict[int, _Unit] = {}
        self._cursor = 0

    def __len__(self) -> int:
        return len(self._where)

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    def add(self, state: DecodeState) -> None:
        self.add_many([state])

    def add_many(self, states: List[DecodeState]) -> None:
        """Add prefilled states; the small ones are packed into shared lanes with one merge
        (one copy of the lane's cache) per lane, however many join it."""
        for state in states:
            if not state.prefilled or state.done:
                raise ValueError("DecodeBatch.add needs a prefilled state that is not done")
        joining: Dict[int, List[DecodeState]] = {}
        fresh: List[_Unit] = []
        room = {id(u): self.lane_rows - u.rows for u in self.units if u.shared}
        for state in states:
            small = len(state.groups) == 1 and state.n_rows <= self.lane_rows and is_plain(state.groups[0].cache)
            if not small:
                unit = _Unit(state.groups, [state], shared=False)
                self.units.append(unit)
                self._where[id(state)] = unit
                continue
            unit = next((u for u in self.units + fresh if u.shared and room[id(u)] >= state.n_rows), None)
            if unit is None:
                unit = _Unit([], [], shared=True)
                fresh.append(unit)
                room[id(unit)] = self.lane_rows
            room[id(unit)] -= state.n_rows
            joining.setdefault(id(unit), []).append(state)
        self.units.extend(fresh)
        for unit in self.units:
            new = joining.get(id(unit))
            if not new:
                continue
            parts = unit.groups + [s.groups[0] for s in new]
            unit.groups = [merge_run(parts) if len(parts) > 1 else parts[0]]
            for s in new:
                unit.members.append(s)
                s.groups = []  # its cache now lives in the lane
                self._where[id(s)] = unit

    def remove(self, state: DecodeState) -> None:
        """Take ``state``'s rows out (no-op when it is not here); frees them now."""
        self.remove_many([state])

    def remove_many(self, states: List[DecodeState]) -> None:
        """Take the rows of ``states`` out (those not here are ignored): one compaction per
        lane, however many of its requests leave together (they often end at the same step)."""
        leaving: Dict[int, Tuple[_Unit, set]] = {}
        for state in states:
            unit = self._where.pop(id(state), None)
            if unit is not None:
                leaving.setdefault(id(unit), (unit, set()))[1].add(id(state))
        for unit, gone in leaving.values():
            if not unit.shared or all(id(m) in gone for m in unit.members):
                self._drop_unit(unit)
                continue
            g = unit.groups[0]
            keep_rows, off = [], 0
            for m in unit.members:
                if id(m) not in gone:
                    keep_rows.extend(range(off, off + m.n_rows))
                off += m.n_rows
            keep = torch.tensor(keep_rows, dtype=torch.long, device=g.mask.device)
            mask = g.mask.index_select(0, keep)
            used = mask.any(dim=0).nonzero()
            cut = int(used[0]) if used.numel() else 0  # left columns that are padding in every remaining row
            unit.groups = [Group(list(range(len(keep))), select_rows(g.cache, keep, cut), mask[:, cut:].contiguous(),
                                 g.last_pos.index_select(0, keep))]
            unit.members = [m for m in unit.members if id(m) not in gone]

    def _drop_unit(self, unit: _Unit) -> None:
        i = self.units.index(unit)
        self.units.pop(i)
        if self._cursor > i:
            self._cursor -= 1
        if self.units:
            self._cursor %= len(self.units)
        else:
            self._cursor = 0

    def select(self, budget: int) -> List[_Unit]:
        """Units for the next iteration: round-robin from the cursor, up to ``budget`` rows."""
        if not self.units:
            return []
        n = len(self.units)
        chosen: List[_Unit] = []
        total = 0
        first_skipped = None
        last = self._cursor
        for k in range(n):
            i = (self._cursor + k) % n
            u = self.units[i]
            if not chosen or total + u.rows <= budget:
                chosen.append(u)
                total += u.rows
                last = i
            elif first_skipped is None:
                first_skipped = i
        self._cursor = first_skipped if first_skipped is not None else (last + 1) % n
        return chosen

    @torch.inference_mode()
    def step(self, budget: Optional[int] = None) -> List[DecodeState]:
        """One forward per lane of the selected units; sets each stepped state's ``logits``."""
        units = self.select(budget if budget is not None else self.rows)
        stepped: List[DecodeState] = []
        for unit in units:
            if not unit.shared:  # one large request: exactly its own decode path
                state = unit.members[0]
                state.groups = unit.groups
                self.decoder.forward(state)
                unit.groups = state.groups
                stepped.append(state)
                continue
            g = unit.groups[0]
            dev = g.mask.device
            ids = torch.cat([torch.full((m.n_rows, 1), int(m.token), dtype=torch.long) for m in unit.members]).to(dev)
            g.mask = torch.cat([g.mask, torch.ones((g.mask.shape[0], 1), dtype=g.mask.dtype, device=dev)], dim=-1)
            g.last_pos = g.last_pos + 1
            logits, g.cache = self.decoder._forward(ids, g.mask, g.last_pos, g.cache)
            off = 0
            for m in unit.members:
                m.logits = logits[off : off + m.n_rows][m.inverse]
                off += m.n_rows
                stepped.append(m)
        return stepped


class StepScheduler:
    """Admission, chunked prefill and batched decode steps for many :class:`DecodeState`.

    >>> sched = StepScheduler(decoder)
    >>> sched.add(decoder.start("q1", ["p1", "p2"])); sched.add(decoder.start("q2", ["p3"], max_new_tokens=8))
    >>> while sched.busy:
    ...     for r in sched.step(): print(r.state, [e.text for e in r.events], r.error)
    """

    def __init__(self, decoder: NBCEDecoder, config: Optional[SchedulerConfig] = None):
        self.decoder = decoder
        self.config = config or SchedulerConfig()
        self.batch = DecodeBatch(decoder, self.config.lane_rows)
        self.waiting: Deque[DecodeState] = deque()
        self.prefilling: Deque[DecodeState] = deque()
        self.settled: Deque[DecodeState] = deque()  #: states with a preset answer (no row to run)
        self.steps = 0
        self._served: Dict[int, int] = {}  # iteration of each prefilling state's last chunk
        self._admitted: Dict[int, int] = {}

    @property
    def active(self) -> int:
        """Requests admitted (prefilling or decoding)."""
        return len(self.prefilling) + len(self.batch)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.settled or len(self.batch))

    @property
    def free(self) -> int:
        """How many more requests would be admitted at the next step."""
        return max(0, self.config.max_active - self.active - len(self.waiting))

    def add(self, state: DecodeState) -> None:
        """Queue a state from :meth:`NBCEDecoder.start` for admission at the next step."""
        if state.done:
            raise ValueError("this state is already done")
        if state.preset is not None:  # answered before decoding (the pipeline's abstention)
            self.settled.append(state)
            return
        self.waiting.append(state)

    def remove(self, state: DecodeState, reason: Optional[str] = None) -> Optional[StreamEvent]:
        """Take ``state`` out now, wherever it is, and free its rows. With ``reason`` (e.g.
        ``"cancelled"``) it is finished and its final event is returned."""
        for q in (self.waiting, self.prefilling, self.settled):
            try:
                q.remove(state)
            except ValueError:
                pass
        self.batch.remove(state)
        self._served.pop(id(state), None)
        self._admitted.pop(id(state), None)
        if reason is not None and not state.done:
            return self.decoder.finish(state, reason)
        state.groups = []
        return None

    def step(self) -> List[StepResult]:
        """One iteration: admission, a prefill budget, one decode step (see the policy).
        Returns one :class:`StepResult` per request that made progress or failed."""
        self.steps += 1
        cfg = self.config
        while self.waiting and self.active < cfg.max_active:
            state = self.waiting.popleft()
            self._admitted[id(state)] = self.steps
            self.prefilling.append(state)
        results: List[StepResult] = []
        while self.settled:  # preset answers: no model call
            state = self.settled.popleft()
            results.append(StepResult(state, [self.decoder.settle(state)]))
        budget = cfg.prefill_tokens
        ready: List[DecodeState] = []
        for state in self._prefill_order():
            if budget <= 0:
                break
            self._served[id(state)] = self.steps
            before = state._next
            try:
                if self.decoder.prefill(state, max_tokens=budget):
                    self.prefilling.remove(state)
                    self._served.pop(id(state), None)
                    self._admitted.pop(id(state), None)
                    events = self.decoder.advance(state)
                    if not state.done:
                        ready.append(state)
                    results.append(StepResult(state, events))
            except Exception as e:  # noqa: BLE001 - the request fails, the others go on
                self.remove(state)
                results.append(StepResult(state, [], e))
                continue
            taken = state.order[before:state._next] if state._next > before else state.order[before:]
            budget -= len(taken) * max(state.row_tokens(r) for r in taken)  # padded tokens run
        self.batch.add_many(ready)  # the requests prefilled in this iteration join the lanes together
        if len(self.batch):
            try:
                stepped = self.batch.step(cfg.step_rows)
            except Exception as e:  # noqa: BLE001 - a failed forward: its units' requests fail
                logger.exception("a batched decode step failed")
                for unit in list(self.batch.units):
                    for m in list(unit.members):
                        self.remove(m)
                        results.append(StepResult(m, [], e))
                return _merged(results)
            done: List[DecodeState] = []
            for state in stepped:
                try:
                    events = self.decoder.advance(state)
                except Exception as e:  # noqa: BLE001
                    self.remove(state)
                    results.append(StepResult(state, [], e))
                    continue
                if state.done:
                    done.append(state)
                results.append(StepResult(state, events))
            self.batch.remove_many(done)
        return _merged(results)

    def _prefill_order(self) -> List[DecodeState]:
        """Short prefills first (they cost little and give their clients a first token soon);
        but the oldest waiting request goes first when it got no chunk in the last iteration,
        so a long prefill advances at least every other iteration."""
        if not self.prefilling:
            return []

        def left(s: DecodeState) -> int:
            return sum(s.row_tokens(r) for r in s.order[s._next:])

        order = sorted(self.prefilling, key=left)
        oldest = self.prefilling[0]
        if self._served.get(id(oldest), self._admitted.get(id(oldest), self.steps)) < self.steps - 1:
            order.remove(oldest)
            order.insert(0, oldest)
        return order

    def run(self, states: List[DecodeState]) -> List[Tuple[DecodeState, Optional[BaseException]]]:
        """Decode ``states`` to the end (offline use); returns each with its error or None."""
        errors: Dict[int, BaseException] = {}
        for s in states:
            self.add(s)
        while self.busy:
            for r in self.step():
                if r.error is not None:
                    errors[id(r.state)] = r.error
        return [(s, errors.get(id(s))) for s in states]


def _merged(results: List[StepResult]) -> List[StepResult]:
    """One result per state (a state prefilled in this iteration may also have stepped)."""
    out: Dict[int, StepResult] = {}
    for r in results:
        prev = out.get(id(r.state))
        if prev is None:
            out[id(r.state)] = r
        else:
            prev.events.extend(r.events)
            prev.error = prev.error or r.error
    return list(out.values())
