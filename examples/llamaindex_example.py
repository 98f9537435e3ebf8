"""nbce-rag in a LlamaIndex app: a VectorStoreIndex built with CoSENT embeddings serves
candidates, the CoSENT retriever re-scores and filters them, and the NBCE query engine hands
every node to the model as a separate passage, streaming the answer.

    pip install 'nbce-rag[llamaindex]'
    python examples/llamaindex_example.py ["your question"]

Runs on the bundled models (no download, and never LlamaIndex's OpenAI defaults).
"""

from __future__ import annotations

import sys

from llama_index.core import VectorStoreIndex
from llama_index.core.schema import TextNode
from pydoc_data.topics import topics

from nbce_rag import MarginThreshold
from nbce_rag.integrations.llama_index import NBCELLM, CoSENTEmbedding, CoSENTRetriever, NBCEQueryEngine

TOPICS = ["pass", "break", "continue", "del", "return", "global", "nonlocal", "assert", "if", "while"]
QUESTION = "What does the pass statement do?"


def main(question: str = QUESTION) -> None:
    # 1. A LlamaIndex index (any vector store: PGVectorStore, FaissVectorStore, ...) with CoSENT embeddings.
    embed_model = CoSENTEmbedding()  # bundled all-MiniLM-L6-v2
    nodes = [TextNode(text=topics[t], id_=t, metadata={"topic": t}) for t in TOPICS]
    index = VectorStoreIndex(nodes, embed_model=embed_model)

    # 2. Candidates from the index, re-scored with the canonical cosine, filtered by a
    #    (here hand-set; use `nbce-rag calibrate`) margin threshold.
    threshold = MarginThreshold(threshold=0.4, lower=0.3, upper=0.6, margin=0.15,
                                encoder_identity=embed_model.encoder.identity)
    retriever = CoSENTRetriever(vector_store=index, encoder=embed_model, threshold=threshold, similarity_top_k=4)

    # 3. NBCE on the bundled SmolLM2-135M-Instruct; streaming answer.
    engine = NBCEQueryEngine(retriever=retriever, llm=NBCELLM(max_new_tokens=32), streaming=True)

    print(f"Q: {question}\nA: ", end="", flush=True)
    response = engine.query(question)
    response.print_response_stream()
    print("\n")
    info = response.metadata["nbce"]
    if not info["supported"]:
        print("(unsupported: no passage passed the filter; the answer comes from the model alone)")
    print("Sources:")
    for i, (node, src) in enumerate(zip(response.source_nodes, info["sources"]), 1):
        print(f"  [{i}] {node.node.node_id}  cosine {node.score:.3f}  {src['share']:.0%} of the answer's tokens")


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or QUESTION)
