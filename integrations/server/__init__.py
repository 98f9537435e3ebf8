"""An OpenAI-compatible HTTP server over a :class:`~nbce_rag.pipeline.RAGPipeline`.

RAG app backends speak the OpenAI API; this makes nbce-rag one of them. Needs the ``server``
extra (``pip install 'nbce-rag[server]'``: fastapi, uvicorn, pydantic). Start it with
``nbce-rag serve [--index DIR] [--model M] [--host H --port P] [--api-key K]``, or build the
app yourself::

    from nbce_rag import RAGPipeline
    from nbce_rag.integrations.server import create_app, ServerLimits
    app = create_app(RAGPipeline.from_pretrained(index="my_index"), api_key="secret")
    # uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints
---------
``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings`` (the CoSENT encoder), ``GET /health``
(never needs the API key: ``{"status": "ok", "queued", "busy", "active", "stats"}``).

Parts: :mod:`.protocol` (the OpenAI request models and error format), :mod:`.worker` (the
model worker over :class:`nbce_rag.decoding.scheduler.StepScheduler`), :mod:`.state` (``ServerLimits``
and the request checks and request -> pipeline mapping the endpoints share), :mod:`.responses`
(the ``nbce`` extension and server-sent events), :mod:`.app` (the FastAPI app and its routes).

Requests (what is read, what it maps to)
----------------------------------------
* The **question** is the text of the last ``user`` message (``content`` a string, or a list
  of ``{"type": "text", "text": ...}`` parts joined by newlines); ``system``/``developer``
  messages are joined and become the decoder's ``system_prompt``; earlier user/assistant
  turns are ignored (NBCE answers one question). ``/v1/completions`` reads ``prompt`` (a
  string or a list of one string).
* ``max_tokens`` / ``max_completion_tokens`` -> ``max_new_tokens`` (default: the decoder's,
  64). ``stop`` (a string or up to ``ServerLimits.max_stop`` strings), ``seed``.
* ``temperature``: omitted or ``0`` = greedy (the decoder's default, as
  ``RAGPipeline.ask``); ``> 0`` = sampling at that temperature. ``top_p`` shapes sampling
  and never turns it on (the one mapping of every surface, ``nbce_rag.config.OPENAI_PARAMS``).
  ``frequency_penalty`` / ``presence_penalty`` (and the NBCEConfig names ``repetition_penalty``,
  ``no_repeat_ngram_size``, ``min_p``, ...) apply to the fused scores, every name of
  ``OPENAI_PARAMS`` is read. ``n`` must be 1; ``logprobs``/``echo`` are refused. Other OpenAI
  parameters (``user``, ``logit_bias``, ...) are accepted and ignored.
* ``model`` must be the served name or one of its aliases (``create_app(model_name=, aliases=)``,
  ``nbce-rag serve --served-model-name NAME [ALIAS ...]``), or omitted: anything else is a
  **404** (``code: "model_not_found"``). ``tools``, ``tool_choice``, ``functions``,
  ``response_format`` other than text are a **400** (``code: "unsupported_parameter"``).

Passages (request extension fields, sent by the ``openai`` client through ``extra_body``)
-------------------------------------------------------------------------------------------
* ``documents``: vLLM's field, a list of ``{"title": str, "text": str}`` (also accepted:
  ``"id"``, ``"score"``, or a plain string). The model reads ``title + "\\n" + text`` (just
  ``text`` without a title), one NBCE row per document. ``contexts: [str]`` is an alias.
* When neither field is sent and the pipeline has an index, the server retrieves ``k``
  candidates and filters them with the pipeline's calibration (``keep``: the rows;
  ``support``: the ``supported`` flag). When no candidate passes, the answer says that nothing
  in the documents answers the question (no decoding; ``nbce.answered_from: "abstained"``), or,
  with ``nbce.on_unsupported: "closed_book"``, the model answers alone (flagged). With no
  index the question is answered closed-book. ``"documents": []`` means "no passages" (no
  retrieval).
* With a calibration, given documents are re-scored and filtered too (as ``RAGPipeline``);
  they are never all dropped in silence: when none passes, the best-scoring one is decoded,
  ``supported`` is false and ``nbce.notes`` says so.
* ``nbce``: optional NBCE settings, ``{"pooling": "auto"|"min_entropy"|"mean"|"max"|"replug"|
  "scored_entropy", "beta": 0.25, "eta": 0.1, "nbce_top_p": 0.95, "k": 10,
  "on_unsupported": "abstain"|"closed_book"}`` (``k``: how many candidates to retrieve from the
  index). Unknown keys are a 400.

Responses (extension field)
---------------------------
Non-streaming responses, and the last chunk of a stream (the one with ``finish_reason``),
carry a top-level ``nbce`` object (the ``openai`` client exposes it as
``response.model_extra["nbce"]``)::

    "nbce": {"supported": true,          # the filter's support decision (and some passage decoded)
             "support_score": 0.71,      # the best candidate's cosine (null: no filter ran)
             "support_threshold": 0.48,  # the calibration's support threshold
             "answered_from": "passages",  # or "abstained" (nothing passed) / "closed_book"
             "notes": [],                # what the pipeline did that the client should know
             "retrieved": false,         # true: passages came from the server's index
             "sources": [{"index": 0,    # position in the request's documents (null if retrieved)
                          "id": "...", "title": "...", "score": 0.71,   # score: cosine, if known
                          "n_tokens": 12, "share": 0.75,                # tokens drawn from it
                          "weight_initial": 0.9, "weight_final": 1.0,   # pooling weight, first/last token
                          "text": "..."}],                               # only for retrieved passages
             "dropped": [{"index", "id", "title", "score", "code", "reason"}],  # what the filter removed
             "calibration": "prior for ... (...)"}                     # which calibration filtered

``usage`` (``prompt_tokens`` = tokens prefilled over all NBCE rows) is on every non-streaming
response, and on streams in one extra chunk with ``"choices": []`` when
``stream_options: {"include_usage": true}``. Streams end with ``data: [DONE]``.

Robustness
----------
* One model worker thread owns the model. Generation requests are decoded *together* by a
  step scheduler (:mod:`nbce_rag.decoding.scheduler`): each request is a group of NBCE rows that
  steps whole; all active groups share batched decode forwards (left-padded caches, per-row
  positions, each request's token fed to its own rows), are fused per request, and each
  client gets its own tokens. New requests are admitted between steps (up to
  ``ServerLimits.max_active``) and prefilled in chunks of ``prefill_tokens`` padded tokens;
  a decode step takes at most ``step_rows`` rows (a larger request steps alone, in turns);
  finished or cancelled requests leave at once and their rows are cut out of the cache.
  The rest wait in a bounded queue (``max_queue``); a full queue answers **503**
  (``code: "server_overloaded"``) at once.
* Per-request timeout (``request_timeout_s``, counted from arrival, queue time included):
  **504** (``type: "timeout"``) before the first token; on a stream that already started,
  an OpenAI-format error event ``data: {"error": {...}}`` followed by ``data: [DONE]`` (the
  ``openai`` client raises ``APIError``). The worker stops decoding that request.
* The deadline covers the whole request: the worker checks it (and the client's disconnect
  flag) between iterations, and one iteration is at most one prefill chunk plus one decode
  step. Defaults, on the 2-core CPU of RESULTS_server.md with the bundled 135M model (about
  2-8 ms per prompt token at one thread, depending on load): a prefill chunk of 512 tokens is
  1-4 s; passages are windowed at ``max_row_tokens`` = 512 tokens per row so no single row is
  longer than a chunk; ``max_prompt_tokens`` = 16384 prompt tokens per request (at most ~30-130 s
  of prefill, interleaved with the others' tokens); ``request_timeout_s`` = 120 s. A timed-out
  or disconnected request thus frees its rows within one iteration (a few seconds at worst here,
  well under a second on a GPU).
* A client that disconnects (mid-stream, or while waiting) cancels its request: its rows
  leave the batch at the next step.
* Limits (``ServerLimits``): body size (**413**), number of documents, characters per
  document, question length, ``max_tokens``, stop strings, embedding inputs (**400**).
* Every error is ``{"error": {"message", "type", "param", "code"}}``, including malformed
  JSON or JSON nested deeper than ``max_json_depth`` (400, ``code: "invalid_json"``), a body
  that is not ``application/json`` (**415**), unknown routes (404) and a missing or wrong API
  key (401, ``code: "invalid_api_key"``; send ``Authorization: Bearer <key>``).
* ``allowed_hosts``: a request whose ``Host`` header names another host is a 400
  (``code: "invalid_host"``); ``nbce-rag serve`` sets it to the loopback names when bound to
  loopback without an API key (``--allowed-hosts`` to widen it).

Embeddings
----------
``/v1/embeddings`` encodes with the CoSENT encoder (``encoder=`` of :func:`create_app`; else the
index's encoder; else the bundled all-MiniLM-L6-v2, loaded on first use). ``input`` is a string
or a list of strings (token arrays are refused: with LangChain use
``OpenAIEmbeddings(check_embedding_ctx_length=False)``); ``encoding_format`` ``"float"`` or
``"base64"`` (little-endian float32, the ``openai`` client's default).
"""

from nbce_rag.integrations.server.app import DEFAULT_MODEL_NAME, ServerLimits, create_app, nbce_info
from nbce_rag.integrations.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DocumentIn,
    EmbeddingRequest,
    NBCEOptions,
    OpenAIError,
    StreamOptions,
)
from nbce_rag.integrations.server.worker import ModelWorker

__all__ = ["create_app", "ServerLimits", "ModelWorker", "OpenAIError", "DEFAULT_MODEL_NAME", "nbce_info",
           "ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "ChatMessage", "DocumentIn",
           "NBCEOptions", "StreamOptions"]
