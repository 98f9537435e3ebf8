"""RAGPipeline on the bundled models: index a few pages of Python's language reference (they
ship with CPython as ``pydoc_data.topics``), then answer a question with NBCE and show which
passages the answer came from.

    python examples/pipeline_example.py ["your question"]

Nothing is downloaded: the encoder (all-MiniLM-L6-v2) and the LLM (SmolLM2-135M-Instruct)
come from pip packages. The first run converts the LLM once (~30 s, cached).
"""

from __future__ import annotations

import sys

from pydoc_data.topics import topics

from nbce_rag import CoSENTEncoder, MarginThreshold, RAGPipeline, VectorIndex

TOPICS = ["pass", "break", "continue", "del", "return", "global", "nonlocal", "assert", "if", "while"]
QUESTION = "What does the pass statement do?"


def build_index() -> VectorIndex:
    encoder = CoSENTEncoder.from_pretrained()  # bundled all-MiniLM-L6-v2
    docs = [{"id": name, "text": topics[name], "metadata": {"source": f"pydoc_data.topics[{name!r}]"}} for name in TOPICS]
    return VectorIndex.build(encoder, docs)  # chunked, embedded, searchable by cosine


def main(question: str = QUESTION) -> None:
    index = build_index()
    # A hand-set filter for the demo. For your own corpus, calibrate one on labelled queries:
    #   nbce-rag calibrate --index DIR --queries queries.jsonl --qrels qrels.tsv
    threshold = MarginThreshold(threshold=0.4, lower=0.3, upper=0.6, margin=0.15,
                                encoder_identity=index.encoder_identity)
    rag = RAGPipeline.from_pretrained(index, threshold=threshold, k=4)  # bundled SmolLM2-135M-Instruct

    kept, dropped = rag.select(question)
    print(f"Q: {question}")
    print(f"retrieved {len(kept) + len(dropped)} candidates; {len(kept)} passed the filter")
    for d in dropped:
        print(f"  dropped {d.hit.id}: {d.reason}")

    print("\nA: ", end="", flush=True)
    answer = None
    for event in rag.stream(question, max_new_tokens=32):  # tokens as they are decoded
        print(event.text, end="", flush=True)
        answer = event.answer or answer
    print("\n")
    if not answer.supported:
        print("(unsupported: no passage passed the filter; the answer comes from the model alone)")
    print("Sources:")
    for i, s in enumerate(answer.sources, 1):
        print(f"  [{i}] {s.id}  score {s.score:.3f}  {s.share:.0%} of the answer's tokens  ({s.metadata['source']})")


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or QUESTION)
