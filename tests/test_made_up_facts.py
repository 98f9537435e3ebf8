"""Issue 23: a new user's small corpus of invented facts (facts no model knows), with the
bundled encoder and model: self-calibration works on 8 chunks, the right passage is kept and
decoded even when it scores low, and an off-topic question is not answered as if supported.

The facts are made up, so a right answer can only come from the passage."""

from __future__ import annotations

import pytest

from nbce_rag import MarginThreshold, RAGPipeline, VectorIndex
from nbce_rag.filtering.decisions import SupportDecision
from nbce_rag.filtering.prior import SYNTHETIC_FILENAME
from nbce_rag.pipeline import ABSTAIN_TEXT

#: 8 short Markdown-like documents of invented facts: an HR policy, recipes, a fictional library
FACTS = {
    "hr_policy": "# Parental leave\n\nEmployees of Brindlewood Ltd receive 22 weeks of paid parental leave. Leave "
                 "must be requested from the HR portal at least 6 weeks before it starts. Part-time staff receive "
                 "the same number of weeks, paid pro rata.",
    "expenses": "# Travel expenses\n\nBrindlewood staff book trains through the Railhopper account. Hotel nights are "
                "refunded up to 140 euros in capitals and 95 euros elsewhere. Receipts go to finance within 30 days "
                "of the trip.",
    "recipe_soup": "# Quillberry soup\n\nQuillberry soup is made from roasted quillberries, two leeks and a spoon of "
                   "smoked honey. It simmers for 25 minutes and is served cold with rye crackers.",
    "recipe_bread": "# Marsh bread\n\nMarsh bread uses barley flour, dark beer and caraway. The dough rests overnight "
                    "in a cool cellar and bakes for 50 minutes at 210 degrees.",
    "library": "# The Fernwick package\n\nFernwick parses scanned star charts into tidy tables. Written by Tamsin Okoro "
               "in 2019, it is maintained by volunteers of the Orla observatory.",
    "observatory": "# Orla observatory\n\nThe Orla observatory stands on Mount Pellin at 2,340 metres. Its main "
                   "telescope, named Wren, has a mirror of 1.8 metres.",
    "garden": "# The roof garden\n\nThe roof garden of the Brindlewood office grows lavender, thyme and dwarf apple "
              "trees. Volunteers water it every Tuesday and Friday.",
    "security": "# Badges\n\nVisitors to the Brindlewood office wear a green badge and must be escorted. Lost staff "
                "badges are replaced by the front desk for a fee of 12 euros.",
}
QUESTION = "Who wrote the Fernwick library?"
OFF_TOPIC = "Who painted the Mona Lisa?"


@pytest.fixture(scope="module")
def facts_index(encoder):
    return VectorIndex.build(encoder, [{"id": k, "text": v} for k, v in FACTS.items()])


@pytest.mark.slow
def test_made_up_facts_self_calibrate_keep_the_top_passage_and_decode_it(facts_index, bundled_decoder, tmp_path):
    hits = facts_index.search(QUESTION, 8)
    assert hits[0].id.startswith("library")  # the right chunk ranks first ...
    assert hits[0].score < 0.497  # ... below the one-rule prior's threshold, which dropped it (issue 23)
    from nbce_rag.filtering.synthetic import synthetic_calibration

    with pytest.warns(Warning, match="small corpus"):  # 8 chunks: fewer questions, wider intervals, a note
        th = synthetic_calibration(facts_index, bundled_decoder, n=8, k=8, n_bootstrap=200)
    assert "small corpus" in th.stats["synthetic"]["note"] and th.keep.method == "recall_first"
    d = tmp_path / "idx"
    facts_index.save(d)
    th.save(d / SYNTHETIC_FILENAME)
    rag = RAGPipeline.from_pretrained(d, decoder=bundled_decoder, k=8)
    assert rag.calibration.startswith("synthetic")
    ans = rag.ask(QUESTION, max_new_tokens=16)
    top = [s for s in ans.sources if s.id == hits[0].id]
    assert top and top[0].n_tokens > 0  # kept by the keep rule and decoded
    assert ans.answered_from == "passages" and ans.support_score == pytest.approx(hits[0].score)
    assert "okoro" in ans.text.lower()  # an invented fact: only the passage knows it


@pytest.mark.slow
def test_made_up_facts_support_and_keep_decide_apart(facts_index, bundled_decoder):
    """A support rule calibrated above the question's best score (as an off-topic-fitted prior may
    be) and a recall-first keep rule below it: the question is answered from the kept passage,
    flagged unsupported; an off-topic question abstains (closed-book when asked)."""
    s_top = facts_index.search(QUESTION, 1)[0].score
    s_off = facts_index.search(OFF_TOPIC, 1)[0].score
    assert s_off < s_top
    keep_t = (s_off + s_top) / 2
    th = MarginThreshold(threshold=keep_t, lower=keep_t, upper=0.9, margin=0.3,
                         encoder_identity=facts_index.encoder_identity,
                         support=SupportDecision(threshold=min(s_top + 0.05, 0.99), stats={"method": "off_topic"}))
    rag = RAGPipeline(bundled_decoder, facts_index, th, k=8)
    ans = rag.ask(QUESTION, max_new_tokens=16)
    assert [s.id for s in ans.sources] == [facts_index.search(QUESTION, 1)[0].id]
    assert ans.supported is False and ans.answered_from == "passages" and "below the support threshold" in ans.notes[0]
    assert "okoro" in ans.text.lower()
    off = rag.ask(OFF_TOPIC, max_new_tokens=16)
    assert off.text == ABSTAIN_TEXT and off.supported is False and off.sources == []
    cb = rag.ask(OFF_TOPIC, max_new_tokens=16, on_unsupported="closed_book")
    assert cb.answered_from == "closed_book" and cb.supported is False and cb.text != ABSTAIN_TEXT


def test_shipped_prior_keeps_the_right_low_scoring_passage(facts_index, encoder):
    """With no calibration of its own, an index filters with the shipped prior: its keep rule
    keeps the right chunk of the made-up-facts corpus (ranked first, scored well below the v1
    prior's 0.497) and the score the issue reported for it (0.339), and drops the unrelated chunks."""
    import numpy as np

    from nbce_rag.filtering.prior import find_prior

    th = find_prior(encoder)
    hits = facts_index.search(QUESTION, 8)
    s = np.array([h.score for h in hits])
    keep = th.keep_mask(s, np.zeros(len(s)))
    assert hits[0].id.startswith("library") and s[0] < 0.497
    assert keep.tolist() == [True] + [False] * 7
    reported = np.array([0.339, 0.165, 0.148])  # the corpus: right chunk first at 0.339
    assert th.keep_mask(reported, np.zeros(3)).tolist() == [True, False, False]
    off = np.array([h.score for h in facts_index.search(OFF_TOPIC, 8)])
    assert not th.keep_mask(off, np.zeros(8)).any() and not th.support.supported(off.max())


@pytest.mark.slow
def test_made_up_facts_default_pipeline_answers_from_the_top_passage(facts_index, bundled_decoder, tmp_path):
    """The issue's case end to end with every default (no calibration file: the shipped prior):
    the question is answered from its top passage, not closed-book with an invented name."""
    d = tmp_path / "idx"
    facts_index.save(d)
    rag = RAGPipeline.from_pretrained(d, decoder=bundled_decoder, k=8)
    assert rag.calibration.startswith("prior")
    ans = rag.ask(QUESTION, max_new_tokens=16)
    assert [s.id for s in ans.sources][:1] == [facts_index.search(QUESTION, 1)[0].id]
    assert ans.answered_from == "passages"
    assert "okoro" in ans.text.lower()  # an invented fact: only the passage knows it
