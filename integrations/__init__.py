"""Framework adapters, installed as ``nbce_rag.integrations``; each needs its extra:

- ``nbce_rag.integrations.langchain``   (``pip install nbce-rag[langchain]``)
- ``nbce_rag.integrations.llama_index`` (``pip install nbce-rag[llamaindex]``)
- ``nbce_rag.integrations.server``      (``pip install nbce-rag[server]``)

Adapters are thin: every one calls ``NBCEDecoder.stream`` / ``.generate`` (through
``RAGPipeline``; the server drives the same step API through ``nbce_rag.decoding.scheduler``, so that
concurrent requests share decode steps), so streaming, stops, token accounting and
attribution are written once;
retrieval and filtering go through ``nbce_rag.retrieval.selection.select``, request options through
``nbce_rag.config.openai_options``, and answers are reported with ``Answer.usage()`` /
``Answer.metadata()``. An adapter only queries its framework's store and converts types.
"""
