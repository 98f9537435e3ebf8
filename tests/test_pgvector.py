"""End to end against a real PostgreSQL + pgvector server: candidates drawn from a LangChain
``PGVector`` store and a LlamaIndex ``PGVectorStore``, re-scored with the canonical cosine,
filtered, answered with NBCE -- equal to RAGPipeline over the embedded index.

The server comes from the PyPI package ``pgserver`` (PostgreSQL + pgvector binaries); the
module starts it in a temporary directory (unix socket only) and stops it at the end.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile

import pytest

pgserver = pytest.importorskip("pgserver", reason="pgserver (embedded PostgreSQL + pgvector) is not installed")

from nbce_rag import MarginThreshold, RAGPipeline, VectorIndex  # noqa: E402

from conftest import DOCS, N, Q, Q_NONE  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    """A running PostgreSQL with the vector extension; yields the socket directory."""
    # a short path: unix socket paths are limited to ~107 bytes
    # pgserver is installed (the importorskip above), so it must start: a failure here is a failure
    root = tempfile.mkdtemp(prefix="nbcepg")
    try:
        srv = pgserver.get_server(root, cleanup_mode="stop")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        srv.psql("CREATE EXTENSION IF NOT EXISTS vector;")
        assert "vector" in srv.psql("SELECT extname FROM pg_extension;"), "pgserver's PostgreSQL has no pgvector"
        yield root
    finally:
        srv.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def rag(tiny_chat_decoder, encoder):
    index = VectorIndex.build(encoder, [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])
    th = MarginThreshold(threshold=0.35, lower=0.25, upper=0.6, margin=0.25, encoder_identity=encoder.identity)
    return RAGPipeline(tiny_chat_decoder, index, th, k=4)


def test_langchain_pgvector_end_to_end(pg, rag, encoder):
    pytest.importorskip("langchain_postgres")
    from langchain_postgres import PGVector

    from nbce_rag.integrations.langchain import CoSENTEmbeddings, CoSENTRetriever, create_nbce_rag_chain

    store = PGVector(embeddings=CoSENTEmbeddings(encoder=encoder), collection_name="nbce_lc",
                     connection=f"postgresql+psycopg://postgres@/postgres?host={pg}", use_jsonb=True)
    store.add_texts(DOCS, ids=[f"d{i}" for i in range(len(DOCS))], metadatas=[{"n": i} for i in range(len(DOCS))])
    ret = CoSENTRetriever(vectorstore=store, threshold=rag.threshold, k=rag.k)
    for q in (Q, Q_NONE):
        kept, _ = rag.select(q)
        docs = ret.invoke(q)
        assert [d.page_content for d in docs] == [p.text for p in kept]
        assert [d.metadata["score"] for d in docs] == pytest.approx([p.score for p in kept], abs=1e-5)
        # pgvector reports the cosine *distance*; the filter sees the cosine
        assert all(d.metadata["store_score"] == pytest.approx(1 - d.metadata["score"], abs=1e-4) for d in docs)
        assert [d.id for d in asyncio.run(ret.ainvoke(q))] == [d.id for d in docs]
    assert ret.invoke(Q_NONE) == []
    chain = create_nbce_rag_chain(ret, rag.as_langchain_chat_model(max_tokens=N))
    for q in (Q, Q_NONE):
        ref = rag.ask(q, max_new_tokens=N).text
        assert chain.invoke(q)["answer"] == ref
        assert "".join(chain.pick("answer").stream(q)) == ref
        assert asyncio.run(chain.ainvoke(q))["answer"] == ref


def test_llama_index_pgvector_end_to_end(pg, rag, encoder):
    pytest.importorskip("llama_index.vector_stores.postgres")
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.postgres import PGVectorStore

    from nbce_rag.integrations.llama_index import NBCELLM, CoSENTEmbedding, CoSENTRetriever, NBCEQueryEngine

    store = PGVectorStore(connection_string=f"postgresql+psycopg2://postgres@/postgres?host={pg}",
                          async_connection_string=f"postgresql+asyncpg://postgres@/postgres?host={pg}",
                          table_name="nbce_li", embed_dim=encoder.dim)
    emb = CoSENTEmbedding(encoder=encoder)
    vindex = VectorStoreIndex([TextNode(text=t, id_=f"d{i}") for i, t in enumerate(DOCS)],
                              storage_context=StorageContext.from_defaults(vector_store=store), embed_model=emb)
    # the raw store (it keeps the text) and the index over it are both candidate sources
    rets = [CoSENTRetriever(vector_store=source, encoder=encoder, threshold=rag.threshold, similarity_top_k=rag.k)
            for source in (store, vindex)]
    for ret in rets:
        for q in (Q, Q_NONE):
            kept, _ = rag.select(q)
            nodes = ret.retrieve(q)
            assert [n.node.get_content() for n in nodes] == [p.text for p in kept]
            assert [n.score for n in nodes] == pytest.approx([p.score for p in kept], abs=1e-5)
    engine = NBCEQueryEngine(retriever=rets[0], llm=NBCELLM.from_pipeline(rag), decode_kwargs={"max_new_tokens": N})
    refs = {q: rag.ask(q, max_new_tokens=N) for q in (Q, Q_NONE)}
    for q, ref in refs.items():
        r = engine.query(q)
        assert r.response == ref.text and r.metadata["nbce"]["supported"] is ref.supported

    async def run_async():  # one event loop: the store's asyncpg engine is bound to it
        for ret in rets:
            for q in (Q, Q_NONE):
                anodes = await ret.aretrieve(q)
                assert [n.node.node_id for n in anodes] == [n.node.node_id for n in ret.retrieve(q)]
        return {q: (await engine.aquery(q)).response for q in refs}

    assert asyncio.run(run_async()) == {q: ref.text for q, ref in refs.items()}
