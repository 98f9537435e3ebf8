"""nbce-rag in a LangChain app: any LangChain vector store serves candidates, the CoSENT
retriever re-scores and filters them, and ChatNBCE answers with every document as a separate
NBCE passage, streaming through an LCEL chain.

    pip install 'nbce-rag[langchain]'
    python examples/langchain_example.py ["your question"]

Runs on the bundled models (no download): all-MiniLM-L6-v2 and SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import sys

from langchain_core.vectorstores import InMemoryVectorStore
from pydoc_data.topics import topics

from nbce_rag import MarginThreshold, NBCEDecoder
from nbce_rag.integrations.langchain import ChatNBCE, CoSENTEmbeddings, CoSENTRetriever, create_nbce_rag_chain

TOPICS = ["pass", "break", "continue", "del", "return", "global", "nonlocal", "assert", "if", "while"]
QUESTION = "What does the pass statement do?"


def main(question: str = QUESTION) -> None:
    # 1. A LangChain vector store (swap in PGVector, FAISS, Chroma...) with CoSENT embeddings.
    embeddings = CoSENTEmbeddings()  # bundled all-MiniLM-L6-v2
    store = InMemoryVectorStore(embedding=embeddings)
    store.add_texts([topics[t] for t in TOPICS], ids=TOPICS, metadatas=[{"topic": t} for t in TOPICS])

    # 2. The retriever draws candidates from the store, re-scores them with the canonical cosine
    #    and keeps those that pass the (here hand-set; use `nbce-rag calibrate`) threshold.
    encoder = embeddings.get_encoder()
    threshold = MarginThreshold(threshold=0.4, lower=0.3, upper=0.6, margin=0.15, encoder_identity=encoder.identity)
    retriever = CoSENTRetriever(vectorstore=store, threshold=threshold, k=4)

    # 3. The chat model: NBCE decoding on the bundled SmolLM2-135M-Instruct.
    chat = ChatNBCE(decoder=NBCEDecoder.from_pretrained(), max_tokens=32)

    docs = retriever.invoke(question)
    print(f"Q: {question}")
    print("Passages that passed the filter:")
    for i, d in enumerate(docs, 1):
        print(f"  [{i}] {d.id}  cosine {d.metadata['score']:.3f}  (store score {d.metadata['store_score']:.3f})")

    # 4. question -> retriever -> ChatNBCE, streamed token by token.
    chain = create_nbce_rag_chain(retriever, chat)
    print("\nA: ", end="", flush=True)
    sources = []
    for chunk in chain.stream(question):  # {"input"}, {"context"}, {"answer": piece}..., {"sources", ...}
        print(chunk.get("answer", ""), end="", flush=True)
        sources = chunk.get("sources", sources)
    print()
    for i, s in enumerate(sources, 1):
        print(f"  [{i}] {s['id']}  share of the answer {s['share']:.0%}")


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or QUESTION)
