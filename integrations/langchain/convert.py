"""LangChain types <-> nbce-rag types: ``Document`` / ``text-plain`` content blocks <->
:class:`Passage`, chat messages -> question, passages and system prompt, LLM parameters ->
:class:`NBCEConfig` overrides, :class:`Answer` -> usage metadata and grounding."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.messages.content import create_plaintext_block, create_text_block

from nbce_rag.config import openai_options
from nbce_rag.types import Answer, Passage, as_passage


def document_to_passage(doc: Any) -> Passage:
    """A LangChain ``Document`` (score in ``metadata["score"]``), a ``str``, a dict, a
    :class:`Passage`, or a ``text-plain`` content block, as a :class:`Passage`."""
    if isinstance(doc, Document):
        meta = dict(doc.metadata or {})
        score = meta.pop("score", None)
        return Passage(text=doc.page_content, score=None if score is None else float(score),
                       id=None if doc.id is None else str(doc.id), metadata=meta)
    if isinstance(doc, dict) and doc.get("type") == "text-plain":
        return _block_to_passage(doc)
    return as_passage(doc, where="documents")


def passage_to_document(p: Passage, **extra_meta: Any) -> Document:
    """A :class:`Passage` as a ``Document``; its score goes to ``metadata["score"]``."""
    meta = dict(p.metadata)
    meta.update(extra_meta)
    if p.score is not None:
        meta["score"] = float(p.score)
    return Document(page_content=p.text, id=p.id, metadata=meta)


def _doc_block(doc: Any) -> Dict[str, Any]:
    p = document_to_passage(doc)
    extras: Dict[str, Any] = {"metadata": dict(p.metadata)}
    if p.score is not None:
        extras["score"] = p.score
    if p.id is not None:
        extras["doc_id"] = p.id
    title = p.metadata.get("title") or p.metadata.get("source") or p.id
    # create_plaintext_block puts unknown keywords into the block's ``extras``
    return create_plaintext_block(text=p.text, title=None if title is None else str(title), **extras)


def _block_to_passage(block: Mapping[str, Any]) -> Passage:
    text = block.get("text")
    if not isinstance(text, str):
        raise ValueError(
            "a text-plain block must carry its text inline ('text'); url/base64/file_id "
            "blocks are not fetched by ChatNBCE"
        )
    extras = dict(block.get("extras") or {})
    meta = dict(extras.get("metadata") or {})
    if block.get("title") is not None:
        meta.setdefault("title", block["title"])
    pid = extras.get("doc_id")
    if pid is None:
        bid = block.get("id")
        pid = bid if isinstance(bid, str) and not bid.startswith("lc_") else block.get("title")
    score = extras.get("score")
    return Passage(text=text, score=None if score is None else float(score),
                   id=None if pid is None else str(pid), metadata=meta)


def documents_to_message(question: str, documents: Iterable[Any]) -> HumanMessage:
    """One ``HumanMessage``: a standard ``text-plain`` block per document (text, title, and
    score/id/metadata in ``extras``), then the question as a ``text`` block. This is how
    passages reach :class:`ChatNBCE` as separate passages through any LCEL chain."""
    blocks: List[Any] = [_doc_block(d) for d in documents]
    blocks.append(create_text_block(question))
    return HumanMessage(content=blocks)


_ROLE = {"human": "User", "ai": "Assistant", "tool": "Tool", "function": "Function", "chat": "User"}


def split_messages(messages: Sequence[BaseMessage]) -> Tuple[str, Optional[List[Passage]], Optional[str]]:
    """``(question, passages, system_prompt)`` from chat messages.

    ``text-plain`` blocks (of any message) are the passages (``None`` when there are none);
    system messages form the system prompt; the text of the last human message is the
    question, prefixed by a ``Role: text`` transcript of the earlier turns when there are any.
    """
    system: List[str] = []
    turns: List[Tuple[str, str]] = []
    passages: List[Passage] = []
    for m in messages:
        texts: List[str] = []
        for b in m.content_blocks:
            t = b.get("type")
            if t == "text":
                texts.append(b.get("text") or "")
            elif t == "text-plain":
                passages.append(_block_to_passage(b))
            elif t in ("reasoning", "tool_call", "tool_call_chunk", "invalid_tool_call"):
                continue
            else:
                raise ValueError(
                    f"ChatNBCE reads text and text-plain (passage) content blocks only; got a {t!r} block"
                )
        text = "".join(texts).strip()
        if m.type == "system":
            if text:
                system.append(text)
        elif text:
            turns.append((m.type, text))
    if not turns or turns[-1][0] not in ("human", "chat"):
        raise ValueError("ChatNBCE needs a question: a text block (or string content) in the last human message")
    question = turns[-1][1]
    if len(turns) > 1:
        transcript = "\n".join(f"{_ROLE.get(r, r.capitalize())}: {t}" for r, t in turns[:-1])
        question = f"{transcript}\n\n{question}"
    return question, (passages or None), ("\n\n".join(system) if system else None)


def decode_options(
    *,
    max_tokens: Optional[int] = None,
    stop: Optional[Sequence[str]] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Map the usual LLM parameters to :class:`NBCEConfig` overrides (one layer of
    :func:`nbce_rag.config.openai_options`: ``temperature`` > 0 samples, 0 is greedy;
    ``top_p`` shapes sampling and never turns it on). ``None`` leaves the decoder's default."""
    return openai_options({**dict(extra or {}), "max_tokens": max_tokens, "stop": stop,
                           "temperature": temperature, "top_p": top_p, "seed": seed})


def answer_metadata(answer: Answer) -> Dict[str, Any]:
    """What an answer says about its grounding (:meth:`Answer.metadata`)."""
    return answer.metadata()



#: Answer.usage() (OpenAI names) -> LangChain's UsageMetadata names
_USAGE_NAMES = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens", "total_tokens": "total_tokens"}


def usage_metadata(answer: Answer) -> Dict[str, Any]:
    """LangChain's ``UsageMetadata``: OpenAI's cached prompt tokens become ``input_token_details.cache_read``."""
    u = answer.usage()
    out: Dict[str, Any] = {_USAGE_NAMES[k]: u[k] for k in _USAGE_NAMES}
    out["input_token_details"] = {"cache_read": u["prompt_tokens_details"]["cached_tokens"]}
    return out
