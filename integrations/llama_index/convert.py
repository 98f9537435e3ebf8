"""LlamaIndex types <-> nbce-rag types: nodes <-> :class:`Passage`, chat messages ->
question, :class:`Answer` -> a response's ``additional_kwargs``."""

from __future__ import annotations

from typing import Any, Dict, Sequence

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, TextNode

from nbce_rag.types import Answer, Passage, as_passage


def node_to_passage(node: Any, *, metadata_mode: MetadataMode = MetadataMode.LLM) -> Passage:
    """A ``NodeWithScore`` / node (text as the LLM sees it, ``node_id``, score), or anything
    :func:`nbce_rag.types.as_passage` accepts, as a :class:`Passage`."""
    if isinstance(node, NodeWithScore):
        n = node.node
        return Passage(text=n.get_content(metadata_mode=metadata_mode), score=node.score, id=n.node_id,
                       metadata=dict(n.metadata))
    if isinstance(node, BaseNode):
        return Passage(text=node.get_content(metadata_mode=metadata_mode), id=node.node_id, metadata=dict(node.metadata))
    return as_passage(node, where="contexts")


def passage_to_node(p: Passage) -> NodeWithScore:
    """A :class:`Passage` as a ``NodeWithScore``. Its metadata is kept on the node but hidden
    from the LLM and embedding views, so the text the decoder sees is the passage text."""
    meta = dict(p.metadata)
    keys = list(meta)
    node = TextNode(text=p.text, metadata=meta, excluded_llm_metadata_keys=keys, excluded_embed_metadata_keys=keys)
    if p.id is not None:
        node.id_ = str(p.id)
    return NodeWithScore(node=node, score=p.score)


_ROLE = {MessageRole.USER: "User", MessageRole.ASSISTANT: "Assistant", MessageRole.TOOL: "Tool"}


def messages_to_question(messages: Sequence[ChatMessage]) -> str:
    """The question of a chat: the last user message, prefixed by a ``Role: text``
    transcript of the earlier turns (system messages are left out: set ``system_prompt``)."""
    turns = [(m.role, (m.content or "").strip()) for m in messages if m.role != MessageRole.SYSTEM]
    turns = [(r, t) for r, t in turns if t]
    if not turns:
        raise ValueError("NBCELLM.chat needs a user message with text")
    question = turns[-1][1]
    if len(turns) > 1:
        transcript = "\n".join(f"{_ROLE.get(r, str(r.value).capitalize())}: {t}" for r, t in turns[:-1])
        question = f"{transcript}\n\n{question}"
    return question


def answer_info(answer: Answer) -> Dict[str, Any]:
    """Grounding of an answer as plain data: :meth:`Answer.metadata` (``supported``,
    ``sources``, ``dropped``, ``token_sources``) plus ``finish_reason`` and ``usage``."""
    return {**answer.metadata(), "finish_reason": answer.finish_reason, "usage": answer.usage()}
