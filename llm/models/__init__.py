"""Shared model libraries: load any model directory or compress variant, and the chat primitives."""
