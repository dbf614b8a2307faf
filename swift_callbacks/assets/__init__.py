"""Offline assets library code may use: the tiny model and tokenizer builders (``tiny``) and the bundled demo data
(``data/*.jsonl``, read with ``tiny.load_rows`` or named ``demo:<name>`` in a recipe)."""
