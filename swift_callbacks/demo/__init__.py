"""Offline demo for the swift study: bundled toy data plus tiny tokenizer and model builders."""
