"""The data stage's one-screen summary."""

from __future__ import annotations

from typing import Any

MAX_LISTED = 10  # failed files named on screen; stats.json names every one


def summary(m: dict[str, Any], path: str) -> str:
    """Documents in, changed by normalization, out per drop reason (with the first record dropped for it),
    files that failed to read (each with its error), duplicates, tokens, bytes per token, shards, SFT
    examples and drops, wall time."""
    lines = [f"data: {path}",
             f"  documents in        {m['documents_in']:>12,}"]
    if "documents_normalized" in m:  # stats of older runs lack it
        lines.append(f"  normalized          {m['documents_normalized']:>12,} changed")
    lines.append(f"  after filters       {m['documents_kept_after_filters']:>12,}")
    first = m.get("dropped_first", {})
    for reason, n in m["dropped"].items():
        where = f"  (first: {first[reason]})" if reason in first and reason != "read_error" else ""
        lines.append(f"    dropped {reason:<16}{n:>9,}{where}")
    lines += _read_errors(m["read_errors"], path)
    if any(m["pii_redacted"].values()):
        lines.append("  pii redacted        " + ", ".join(f"{k} {v:,}" for k, v in m["pii_redacted"].items() if v))
    if m["utf8_replacements"]:
        lines.append(f"  invalid utf-8       {m['utf8_replacements']:>12,} replaced")
    lines += [f"  exact duplicates    {m['exact_duplicates']:>12,}",
              f"  fuzzy duplicates    {m['fuzzy_duplicates']:>12,} in {m['fuzzy_clusters']:,} clusters",
              f"  documents out       {m['documents_out']:>12,}",
              f"  tokens train / val  {m['tokens_train']:>12,} / {m['tokens_val']:,}",
              f"  sequences train/val {m['sequences_train']:>12,} / {m['sequences_val']:,} of {m['seq_len']} tokens"
              f" ({m['remainder_tokens_dropped']:,} remainder tokens dropped)",
              f"  bytes per token     {m['bytes_per_token']:>12}",
              f"  vocab size          {m['vocab_size']:>12,}",
              f"  shards              {m['shards']:>12,}"]
    if m.get("sft"):
        s = m["sft"]
        lines.append(f"  sft examples        {s.get('train', 0):>12,} train / {s.get('val', 0):,} val"
                     f" ({s.get('truncated', 0):,} truncated)")
        named = {d["reason"]: d["record"] for d in reversed(m.get("sft_dropped", []))}  # the first of each
        for key, n in s.items():
            if key.startswith("dropped_"):
                reason = key.removeprefix("dropped_")
                where = f"  (first: {named[reason]})" if reason in named else ""
                lines.append(f"    sft dropped {reason:<12}{n:>9,}{where}")
    lines.append(f"  wall time           {m['wall_seconds']:>11.1f}s")
    return "\n".join(lines)


def _read_errors(errors: list[dict[str, str]], path: str) -> list[str]:
    """`file: error` per file that failed to read (data and SFT sources), the first `MAX_LISTED` of them."""
    if not errors:
        return []
    lines = [f"  unreadable files    {len(errors):>12,}"]
    lines += [f"    {e['file']}: {e['error']}" for e in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        lines.append(f"    ... and {len(errors) - MAX_LISTED:,} more, all named in {path}/stats.json")
    return lines
