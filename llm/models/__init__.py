"""Shared model libraries, below every stage: `load` (the one loader of any model directory or compress
variant, where the chosen model is, checked local copies from a store), `int8` (the int8 variant's format
and its reader) and `chat` (the chat primitives)."""
