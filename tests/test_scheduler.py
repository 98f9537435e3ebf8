"""The decoder's step API and the step scheduler (no HTTP): requests decoded together give the
tokens each gives alone (fp32; greedy and seeded sampling; per-request stop, max_new_tokens and
pooling), whatever the admission order, lanes, prefill chunks and row budget; a removed request
frees its rows at once; a huge request neither starves nor is starved; one request's error
never touches another; RAGPipeline.batch equals ask one by one."""

from __future__ import annotations

import pytest

from conftest import DOCS
from nbce_rag import RAGPipeline
from nbce_rag.decoding.scheduler import SchedulerConfig, StepScheduler

#: (question, passages, options): different row counts, lengths, stops, sampling and pooling
CASES = [
    ("Who built the Eiffel Tower?", DOCS[:2], dict(max_new_tokens=8)),
    ("How high is Mount Everest?", DOCS[2:5], dict(max_new_tokens=11, pooling="mean")),
    ("Where do bananas grow?", DOCS[3:4], dict(max_new_tokens=6, beta=0.5)),
    ("At what temperature does water boil?", DOCS, dict(max_new_tokens=9, pooling="max")),
    ("Sampled answer?", DOCS[:3], dict(max_new_tokens=10, do_sample=True, temperature=1.0, seed=3)),
    ("Sampled, top-p?", DOCS[1:3], dict(max_new_tokens=7, do_sample=True, temperature=0.8, top_p=0.9, seed=11)),
    ("Closed book?", [], dict(max_new_tokens=5)),
]


def _alone(dec, cases):
    return [dec.generate(q, p, **o) for q, p, o in cases]


def _same(got, exp):
    assert got.token_ids == exp.token_ids, (got.text, exp.text)
    assert got.text == exp.text and got.token_sources == exp.token_sources
    assert got.finish_reason == exp.finish_reason and got.completion_tokens == exp.completion_tokens
    assert [s.n_tokens for s in got.sources] == [s.n_tokens for s in exp.sources]


@pytest.mark.parametrize("config", [
    SchedulerConfig(),
    SchedulerConfig(step_rows=3, prefill_tokens=24),  # tiny budget: units alternate, prefill in many chunks
    SchedulerConfig(max_active=2, lane_rows=4),  # admission as others finish; small shared lanes
])
def test_scheduled_requests_equal_each_alone(tiny_decoder, config):
    expected = _alone(tiny_decoder, CASES)
    sched = StepScheduler(tiny_decoder, config)
    states = [tiny_decoder.start(q, p, **o) for q, p, o in CASES]
    for (state, err), exp in zip(sched.run(states), expected):
        assert err is None
        _same(state.answer, exp)
    assert not sched.busy and sched.batch.rows == 0
    assert sched.steps < sum(a.completion_tokens for a in expected)  # they really shared steps


def test_streamed_events_rebuild_the_answer_and_stop_strings_per_request(tiny_decoder):
    base = tiny_decoder.generate(*CASES[0][:2], max_new_tokens=12)
    stop = base.text[3:6]
    assert stop.strip()
    cases = [(CASES[0][0], CASES[0][1], dict(max_new_tokens=12, stop=[stop])), *CASES[1:4]]
    expected = _alone(tiny_decoder, cases)
    assert expected[0].finish_reason == "stop" and stop not in expected[0].text
    sched = StepScheduler(tiny_decoder)
    states = [tiny_decoder.start(q, p, **o) for q, p, o in cases]
    texts = {id(s): [] for s in states}
    for s in states:
        sched.add(s)
    while sched.busy:
        for r in sched.step():
            assert r.error is None
            texts[id(r.state)].extend(e.text for e in r.events)
    for s, exp in zip(states, expected):
        _same(s.answer, exp)
        assert "".join(texts[id(s)]) == exp.text  # the stream's pieces are exactly the answer


def test_admission_while_others_stream(tiny_decoder):
    cases = [(CASES[1][0], CASES[1][1], dict(max_new_tokens=20)), CASES[0], CASES[4]]
    expected = _alone(tiny_decoder, cases)
    sched = StepScheduler(tiny_decoder)
    first = tiny_decoder.start(*cases[0][:2], **cases[0][2])
    sched.add(first)
    for _ in range(4):
        sched.step()
    assert len(first.tokens) >= 3 and not first.done
    late = [tiny_decoder.start(q, p, **o) for q, p, o in cases[1:]]
    for s in late:
        sched.add(s)
    sched.step()  # one admission iteration: prefill of the first late one, and a step for `first`
    assert late[0].tokens and not first.done
    while sched.busy:
        assert all(r.error is None for r in sched.step())
    for s, exp in zip([first, *late], expected):
        _same(s.answer, exp)


def test_removed_request_frees_its_rows_at_once(tiny_decoder):
    cases = [(CASES[0][0], CASES[0][1], dict(max_new_tokens=30)), CASES[1], CASES[3]]
    expected = _alone(tiny_decoder, cases)
    sched = StepScheduler(tiny_decoder)
    states = [tiny_decoder.start(q, p, **o) for q, p, o in cases]
    for s in states:
        sched.add(s)
    while not all(s.prefilled for s in states):
        sched.step()
    rows = sched.batch.rows
    ev = sched.remove(states[0], "cancelled")
    assert ev.finish_reason == "cancelled" and states[0].done and states[0].answer.finish_reason == "cancelled"
    assert sched.batch.rows == rows - states[0].n_rows
    assert all(len(u.groups[0].mask) == u.rows for u in sched.batch.units if u.shared)
    while sched.busy:
        sched.step()
    for s, exp in zip(states[1:], expected[1:]):
        _same(s.answer, exp)


def test_huge_request_with_many_small_ones(tiny_decoder):
    huge_docs = [f"{DOCS[i % len(DOCS)]} Fact number {i}." for i in range(30)]
    small = [(f"Small question {i}?", DOCS[i % 5 : i % 5 + 1], dict(max_new_tokens=6)) for i in range(6)]
    cases = [("Tell me everything.", huge_docs, dict(max_new_tokens=6)), *small]
    expected = _alone(tiny_decoder, cases)
    sched = StepScheduler(tiny_decoder, SchedulerConfig(step_rows=12, lane_rows=8, prefill_tokens=200))
    states = [tiny_decoder.start(q, p, **o) for q, p, o in cases]
    huge = states[0]
    assert huge.n_rows > 12
    for s in states:
        sched.add(s)
    done_at = {}
    huge_iters = []  # iterations in which the huge request got a token
    while sched.busy:
        before = len(huge.tokens)
        for r in sched.step():
            assert r.error is None
            if r.state.done:
                done_at[id(r.state)] = sched.steps
        if len(huge.tokens) > before or (huge.done and id(huge) not in done_at):
            huge_iters.append(sched.steps)
    for s, exp in zip(states, expected):
        _same(s.answer, exp)
    # the small ones did not wait for the huge one (its prefill alone takes several chunks) ...
    assert max(done_at[id(s)] for s in states[1:]) < done_at[id(huge)]
    # ... and it was not starved either: once prefilled, it stepped every other iteration at least
    assert huge_iters and all(b - a <= 2 for a, b in zip(huge_iters, huge_iters[1:]))
    assert done_at[id(huge)] == huge_iters[-1]


def test_an_error_in_one_request_never_touches_another(tiny_decoder):
    expected = _alone(tiny_decoder, CASES[:4])
    sched = StepScheduler(tiny_decoder)
    states = [tiny_decoder.start(q, p, **o) for q, p, o in CASES[:4]]
    calls = {"n": 0}

    def broken(logp, ent, scores, prev, eta):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("pooling failed")
        return real(logp, ent, scores, prev, eta)

    real = states[1].pooling
    states[1].pooling = broken
    results = dict((id(s), e) for s, e in sched.run(states))
    assert isinstance(results[id(states[1])], RuntimeError) and not states[1].done
    for s, exp in zip([states[0], *states[2:]], [expected[0], *expected[2:]]):
        assert results[id(s)] is None
        _same(s.answer, exp)
    assert sched.batch.rows == 0


def test_pipeline_batch_equals_ask(tiny_decoder):
    rag = RAGPipeline(tiny_decoder)
    qs = [q for q, _, _ in CASES[:4]]
    ps = [p for _, p, _ in CASES[:4]]
    got = rag.batch(qs, ps, max_new_tokens=7)
    for q, p, a in zip(qs, ps, got):
        _same(a, rag.ask(q, p, max_new_tokens=7))
        assert a.supported == bool(p)
    with pytest.raises(ValueError, match="one per question"):
        rag.batch(qs, ps[:2])
    with pytest.raises(TypeError, match="list of questions"):
        rag.batch("one question")


def test_step_api_drives_one_request_like_stream(tiny_decoder):
    q, p, o = CASES[1]
    exp = tiny_decoder.generate(q, p, **o)
    state = tiny_decoder.start(q, p, **o)
    chunks = 0
    while not tiny_decoder.prefill(state, max_tokens=1):  # one row per chunk
        chunks += 1
    assert chunks == state.n_rows - 1
    with pytest.raises(RuntimeError, match="prefill"):
        tiny_decoder.advance(tiny_decoder.start(q, p, **o))
    events = []
    while True:
        events += tiny_decoder.advance(state)
        if state.done:
            break
        tiny_decoder.forward(state)
    _same(state.answer, exp)
    assert "".join(e.text for e in events) == exp.text and state.groups == []


def test_scheduler_config_is_checked():
    with pytest.raises(ValueError, match="step_rows"):
        SchedulerConfig(step_rows=0)
    with pytest.raises(ValueError, match="lane_rows"):
        SchedulerConfig(lane_rows=0)
    with pytest.raises(ValueError, match="max_active"):
        SchedulerConfig(max_active=0)


def test_scheduler_refuses_misuse(tiny_decoder):
    sched = StepScheduler(tiny_decoder)
    state = tiny_decoder.start(*CASES[2][:2], **CASES[2][2])
    with pytest.raises(ValueError, match="prefilled"):
        sched.batch.add(state)
    sched.run([state])
    assert state.done
    with pytest.raises(ValueError, match="already done"):
        sched.add(state)


@pytest.mark.slow
def test_bundled_model_scheduled_equals_alone(bundled_decoder):
    """The real model (fp32 on the CPU): requests decoded together are token-identical to alone."""
    cases = [(q, p, dict(o, max_new_tokens=min(o["max_new_tokens"], 8))) for q, p, o in CASES[:5]]
    expected = _alone(bundled_decoder, cases)
    states = [bundled_decoder.start(q, p, **o) for q, p, o in cases]
    for (state, err), exp in zip(StepScheduler(bundled_decoder).run(states), expected):
        assert err is None
        _same(state.answer, exp)


def test_requests_join_and_leave_a_lane_together(tiny_decoder, monkeypatch):
    """Requests prefilled in the same iteration join their lane with one merge, and requests
    that end at the same step leave it with one compaction (not one copy of the lane each)."""
    import nbce_rag.decoding.scheduler as scheduler

    merges, cuts = [], []
    real_merge, real_select = scheduler.merge_run, scheduler.select_rows
    monkeypatch.setattr(scheduler, "merge_run", lambda run: merges.append(len(run)) or real_merge(run))
    monkeypatch.setattr(scheduler, "select_rows", lambda *a: cuts.append(1) or real_select(*a))
    eos = sorted(tiny_decoder._find_eos_ids())  # suppressed: every answer runs to its max_new_tokens
    cases = [(q, p, dict(max_new_tokens=6, suppress_tokens=eos)) for q, p, _ in CASES[:3]]
    cases.append((CASES[3][0], CASES[3][1], dict(max_new_tokens=9, suppress_tokens=eos)))
    expected = _alone(tiny_decoder, cases)
    sched = StepScheduler(tiny_decoder)
    states = [tiny_decoder.start(q, p, **o) for q, p, o in cases]
    for (state, err), exp in zip(sched.run(states), expected):
        assert err is None
        _same(state.answer, exp)
    assert merges == [4]  # all four joined in the first iteration: one merge
    assert len(cuts) == 1  # the three 6-token answers left together; the last one dropped the lane
