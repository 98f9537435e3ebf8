"""The LlamaIndex response synthesizer, :class:`NBCESynthesizer`: every node a separate
NBCE passage of :class:`~nbce_rag.integrations.llama_index.llm.NBCELLM`."""

from __future__ import annotations

from typing import Any, AsyncGenerator, Dict, Generator, List, Optional, Sequence

from llama_index.core.base.response.schema import RESPONSE_TYPE, AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import NodeWithScore, QueryBundle

from nbce_rag.integrations.llama_index.convert import answer_info, node_to_passage
from nbce_rag.integrations.llama_index.llm import NBCELLM

#: the package's instrumentation dispatcher (named after the package, as before the split)
dispatcher = get_dispatcher("nbce_rag.integrations.llama_index")


class NBCESynthesizer(BaseSynthesizer):
    """A response synthesizer that hands every node to :class:`NBCELLM` as a separate
    passage (text as the LLM sees it, the node's score and id), instead of stuffing or
    refining them into one prompt. No nodes (e.g. the filter kept nothing) -> as
    :class:`~nbce_rag.RAGPipeline`: with ``on_unsupported="abstain"`` (the default) the answer
    says that nothing in the documents answers the question (no decoding), with
    ``"closed_book"`` the model answers alone; flagged unsupported either way, never
    LlamaIndex's "Empty Response".

    ``Response.metadata["nbce"]`` holds :func:`answer_info` (for streaming responses it is
    filled in when the stream ends). ``llm=None`` builds the default :class:`NBCELLM`
    (bundled model) -- never ``Settings.llm``.
    """

    def __init__(self, llm: Optional[NBCELLM] = None, callback_manager: Optional[CallbackManager] = None,
                 streaming: bool = False, **decode_kwargs: Any) -> None:
        if llm is None:
            llm = NBCELLM()
        if not isinstance(llm, NBCELLM):
            raise TypeError(f"NBCESynthesizer needs an NBCELLM (it passes nodes as separate passages); got {type(llm).__name__}")
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming)
        self._decode_kwargs = decode_kwargs

    @property
    def llm(self) -> NBCELLM:
        return self._llm

    def _get_prompts(self) -> Dict[str, Any]:
        return {}

    def _update_prompts(self, prompts: Dict[str, Any]) -> None:
        pass

    # text-only entry points (abstract in BaseSynthesizer): chunks are the passages
    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        kw = {**self._decode_kwargs, **response_kwargs}
        if self._streaming:
            return (r.delta for r in self._llm.stream_complete(query_str, contexts=list(text_chunks), **kw) if r.delta)
        return self._llm.complete(query_str, contexts=list(text_chunks), **kw).text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        kw = {**self._decode_kwargs, **response_kwargs}
        if self._streaming:
            gen = await self._llm.astream_complete(query_str, contexts=list(text_chunks), **kw)

            async def deltas() -> AsyncGenerator[str, None]:
                async for r in gen:
                    if r.delta:
                        yield r.delta

            return deltas()
        return (await self._llm.acomplete(query_str, contexts=list(text_chunks), **kw)).text

    # node entry points: keep score and id of every node
    def _begin(self, query: Any, nodes: List[NodeWithScore], additional_source_nodes):
        qb = QueryBundle(query_str=query) if isinstance(query, str) else query
        passages = [node_to_passage(n) for n in nodes]
        source_nodes = list(nodes) + list(additional_source_nodes or [])
        meta = self._get_metadata_for_response([n.node for n in source_nodes]) or {}
        return qb, passages, source_nodes, meta

    def _abstains(self, passages: List[Any], kw: Dict[str, Any]) -> bool:
        """No node and ``on_unsupported="abstain"`` (this call's, the LLM's, else its pipeline's)."""
        if passages:
            return False
        mode = self._llm._options(dict(kw)).get("on_unsupported")
        if mode is None:
            mode = self._llm.get_pipeline().decoder.config.on_unsupported
        return mode == "abstain"

    @staticmethod
    def _abstention(source_nodes: List[NodeWithScore], meta: Dict[str, Any], streaming: Optional[str] = None):
        """The abstained response (no decoding), with its ``nbce`` metadata."""
        from nbce_rag.pipeline import ABSTAIN_TEXT
        from nbce_rag.types import Answer

        ans = Answer(text=ABSTAIN_TEXT, token_ids=[], token_sources=[], sources=[], finish_reason="stop",
                     supported=False, answered_from="abstained",
                     notes=["no passage reached the synthesizer: nothing in the documents answers this question "
                            "(on_unsupported='closed_book' lets the model answer alone, flagged)"])
        meta["nbce"] = answer_info(ans)
        if streaming == "sync":
            return StreamingResponse(iter([ABSTAIN_TEXT]), source_nodes=source_nodes, metadata=meta)
        if streaming == "async":
            async def one() -> AsyncGenerator[str, None]:
                yield ABSTAIN_TEXT

            return AsyncStreamingResponse(one(), source_nodes=source_nodes, metadata=meta)
        return Response(ABSTAIN_TEXT, source_nodes=source_nodes, metadata=meta)

    @dispatcher.span
    def synthesize(self, query: Any, nodes: List[NodeWithScore],
                   additional_source_nodes: Optional[Sequence[NodeWithScore]] = None, **response_kwargs: Any) -> RESPONSE_TYPE:
        qb, passages, source_nodes, meta = self._begin(query, nodes, additional_source_nodes)
        dispatcher.event(SynthesizeStartEvent(query=qb))
        kw = {**self._decode_kwargs, **response_kwargs}
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: qb.query_str}) as event:
            if self._abstains(passages, kw):
                response = self._abstention(source_nodes, meta, "sync" if self._streaming else None)
            elif self._streaming:
                stream = self._llm.stream_complete(qb.query_str, contexts=passages, **kw)

                def deltas() -> Generator[str, None, None]:
                    for r in stream:
                        if "supported" in r.additional_kwargs:
                            meta["nbce"] = r.additional_kwargs
                        if r.delta:
                            yield r.delta

                response: RESPONSE_TYPE = StreamingResponse(deltas(), source_nodes=source_nodes, metadata=meta)
            else:
                r = self._llm.complete(qb.query_str, contexts=passages, **kw)
                meta["nbce"] = r.additional_kwargs
                response = Response(r.text, source_nodes=source_nodes, metadata=meta)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=qb, response=response))
        return response

    @dispatcher.span
    async def asynthesize(self, query: Any, nodes: List[NodeWithScore],
                          additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
                          **response_kwargs: Any) -> RESPONSE_TYPE:
        qb, passages, source_nodes, meta = self._begin(query, nodes, additional_source_nodes)
        dispatcher.event(SynthesizeStartEvent(query=qb))
        kw = {**self._decode_kwargs, **response_kwargs}
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: qb.query_str}) as event:
            if self._abstains(passages, kw):
                response = self._abstention(source_nodes, meta, "async" if self._streaming else None)
            elif self._streaming:
                stream = await self._llm.astream_complete(qb.query_str, contexts=passages, **kw)

                async def deltas() -> AsyncGenerator[str, None]:
                    async for r in stream:
                        if "supported" in r.additional_kwargs:
                            meta["nbce"] = r.additional_kwargs
                        if r.delta:
                            yield r.delta

                response: RESPONSE_TYPE = AsyncStreamingResponse(deltas(), source_nodes=source_nodes, metadata=meta)
            else:
                r = await self._llm.acomplete(qb.query_str, contexts=passages, **kw)
                meta["nbce"] = r.additional_kwargs
                response = Response(r.text, source_nodes=source_nodes, metadata=meta)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=qb, response=response))
        return response
