"""The LlamaIndex query engine, :class:`NBCEQueryEngine`: retrieve -> postprocess ->
:class:`~nbce_rag.integrations.llama_index.synthesizer.NBCESynthesizer`."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from llama_index.core.base.response.schema import RESPONSE_TYPE, AsyncStreamingResponse, StreamingResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle

from nbce_rag.integrations.llama_index.llm import NBCELLM
from nbce_rag.integrations.llama_index.retriever import CoSENTRetriever
from nbce_rag.integrations.llama_index.synthesizer import NBCESynthesizer


class NBCEQueryEngine(CustomQueryEngine):
    """retrieve -> node postprocessors -> :class:`NBCESynthesizer`, as a query engine.

    ``query(q)`` returns a ``Response`` (``StreamingResponse`` with ``streaming=True``) whose
    ``source_nodes`` are the passages the decoder saw and ``metadata["nbce"]`` says whether
    the answer is supported and what each passage contributed; ``aquery`` is the async twin
    (``AsyncStreamingResponse`` when streaming). With a :class:`CoSENTRetriever` that filters,
    ``metadata["nbce"]`` reports the filter's decisions as :meth:`RAGPipeline.ask` does:
    ``supported`` (the support decision), ``support_score`` / ``support_threshold``,
    ``calibration`` and ``dropped``. When nothing survives retrieval and filtering, the answer
    abstains (``on_unsupported="closed_book"``: closed-book), ``supported=False``.

    ``NBCEQueryEngine.from_pipeline(rag)`` (or ``rag.as_query_engine()``) answers exactly as
    ``rag.ask``. Pass ``decode_kwargs`` (e.g. ``max_new_tokens=32``) for per-engine options.
    """

    retriever: Any = Field(description="a LlamaIndex BaseRetriever (e.g. CoSENTRetriever)")
    llm: Any = Field(default=None, description="an NBCELLM (None: the bundled model)")
    node_postprocessors: List[Any] = Field(default_factory=list)
    streaming: bool = False
    decode_kwargs: Dict[str, Any] = Field(default_factory=dict)
    calibration: Optional[str] = Field(default=None, description="which calibration filters (set by from_pipeline)")

    _synth: Any = PrivateAttr(default=None)

    def model_post_init(self, __context: Any) -> None:
        if self.llm is None:
            self.llm = NBCELLM()
        self._synth = NBCESynthesizer(llm=self.llm, callback_manager=self.callback_manager, streaming=self.streaming,
                                      **self.decode_kwargs)

    @classmethod
    def from_pipeline(cls, pipeline: Any, *, streaming: bool = False, **kwargs: Any) -> "NBCEQueryEngine":
        """A query engine that retrieves, filters and decodes like ``pipeline.ask``. Keywords
        other than the engine's fields (``retriever``, ``llm``, ``node_postprocessors``,
        ``decode_kwargs``) are decoding options (e.g. ``max_new_tokens=32``)."""
        fields = {k: kwargs.pop(k) for k in ("retriever", "llm", "node_postprocessors", "decode_kwargs", "callback_manager",
                                             "calibration") if k in kwargs}
        decode = {**fields.pop("decode_kwargs", {}), **kwargs}
        retriever = fields.pop("retriever", None) or CoSENTRetriever.from_pipeline(pipeline)
        llm = fields.pop("llm", None) or NBCELLM.from_pipeline(pipeline)
        fields.setdefault("calibration", getattr(pipeline, "calibration", None))
        return cls(retriever=retriever, llm=llm, streaming=streaming, decode_kwargs=decode, **fields)

    @property
    def synthesizer(self) -> NBCESynthesizer:
        return self._synth

    def _nodes(self, query_str: str) -> List[NodeWithScore]:
        qb = QueryBundle(query_str)
        nodes = self.retriever.retrieve(qb)
        for pp in self.node_postprocessors:
            nodes = pp.postprocess_nodes(nodes, query_bundle=qb)
        return nodes

    async def _anodes(self, query_str: str) -> List[NodeWithScore]:
        qb = QueryBundle(query_str)
        nodes = await self.retriever.aretrieve(qb)
        for pp in self.node_postprocessors:
            nodes = await pp.apostprocess_nodes(nodes, query_bundle=qb)
        return nodes

    def custom_query(self, query_str: str) -> RESPONSE_TYPE:
        nodes = self._nodes(query_str)
        return self._ground(self._synth.synthesize(query_str, nodes), nodes)

    async def acustom_query(self, query_str: str) -> RESPONSE_TYPE:
        nodes = await self._anodes(query_str)
        return self._ground(await self._synth.asynthesize(query_str, nodes), nodes)

    def _grounding(self, nodes: List[NodeWithScore]) -> Optional[Dict[str, Any]]:
        """The retriever's filter decisions for the answer's ``nbce`` metadata (None: no filter ran)."""
        sel = getattr(self.retriever, "last_selection", None)
        res = getattr(sel, "result", None)
        if res is None:
            return None
        th = getattr(self.retriever, "threshold", None)
        calibration = self.calibration or (f"{(getattr(th, 'stats', None) or {}).get('source', 'given')} "
                                           f"(threshold {res.threshold:.3f})")
        g: Dict[str, Any] = {"supported": bool(res.supported) and bool(nodes), "support_score": res.support_score,
                             "support_threshold": res.support_threshold, "calibration": calibration,
                             "dropped": list(getattr(self.retriever, "last_dropped", []))}
        if nodes and not res.supported:
            g["notes"] = [f"the best candidate scores {res.support_score:.3f}, below the support threshold "
                          f"{res.support_threshold:.3f}: answered from the {len(nodes)} passage(s) that passed the "
                          "keep rule, flagged unsupported"]
        return g

    def _ground(self, response: Any, nodes: List[NodeWithScore]) -> Any:
        """Set the filter's decisions on ``response.metadata["nbce"]`` (when a stream ends, for
        streaming responses: the synthesizer fills that entry at the end)."""
        g = self._grounding(nodes)
        if g is None:
            return response

        def apply() -> None:
            if response.metadata is None:
                response.metadata = {}
            response.metadata.setdefault("nbce", {}).update(g)

        if isinstance(response, StreamingResponse):
            gen = response.response_gen

            def wrapped():
                yield from gen
                apply()

            response.response_gen = wrapped()
        elif isinstance(response, AsyncStreamingResponse):
            agen = response.response_gen

            async def awrapped():
                async for t in agen:
                    yield t
                apply()

            response.response_gen = awrapped()
        else:
            apply()
        return response
