"""Shared model libraries, below every stage: `load` (the one loader of any model directory or compress
variant, where the chosen model is, checked local copies from a store), `int8` (the int8 variant's format
and its reader), `chat` (the chat primitives) and `stops` (where an answer ends: eos and the template's
end-of-turn token, the rule eval and serve share, and the `generation_config.json` that carries it)."""
