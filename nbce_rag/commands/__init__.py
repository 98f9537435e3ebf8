"""Subcommands of the ``nbce-rag`` CLI: one module each, each with ``register(subparsers)``."""
