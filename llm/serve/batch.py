"""The running batch of continuous batching: a left-padded KV cache shared by every sequence in flight.

Rows join after their own prefill (their caches are left-padded to a common length and concatenated),
decode together one token per forward pass, and leave when done. Left padding keeps every row's newest
token in the last column, so one decode step is one `(rows, 1)` forward for the whole batch; the
attention mask hides the padding and explicit position ids keep each row's positions its own. A batch
without padding (rows of one length, or padding every row has left) decodes without them, as a plain
batched decode loop does: the model then builds no mask at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the serve stage's import must not load it
    import torch


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    import torch.nn.functional as F

    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]  # F.pad lists dims from the last backwards
    return F.pad(t, pad)


class PaddedBatch:
    """KV cache, attention mask and positions of the rows decoding together."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._cache: Any = None
        """The `DynamicCache` decode steps extend in place; rebuilt only when rows join or leave."""
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._unpadded_steps = 0
        """Decode steps since `_mask` was last written while no row had padding (its columns of ones are
        added when the mask is next read, not at every step)."""
        self._padded = False
        """Whether some row has padding (then each step passes the mask and positions to the model)."""
        self.device = next(model.parameters()).device

    @property
    def mask(self) -> torch.Tensor:
        """`(rows, length)`: 1 where a row has a real token, 0 on its left padding."""
        if self._unpadded_steps:
            import torch

            ones = torch.ones(self._mask.shape[0], self._unpadded_steps, dtype=torch.long)
            self._mask, self._unpadded_steps = torch.cat([self._mask, ones], dim=1), 0
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        self._mask, self._unpadded_steps = value, 0
        self._padded = bool(value.numel()) and not bool(value.all())

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of every row, `(rows, heads, length, head_dim)`."""
        if self._cache is not None:
            self._kv = [(layer.keys, layer.values) for layer in self._cache.layers]
            self._cache = None
        return self._kv

    @kv.setter
    def kv(self, value: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._kv, self._cache = value, None

    @property
    def rows(self) -> int:
        return int(self._mask.shape[0])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None, keep: int = 1) -> tuple[torch.Tensor, list[Any]]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        # `logits_to_keep=1`: the head runs on the last position only (a prefill of 16 full-context prompts
        # would otherwise hold rows x length x vocab floats that nothing reads).
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=keep)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits.float(), layers

    def prefill(self, prompts: list[list[int]], pad_id: int, every_position: bool = False) -> torch.Tensor:
        """Run new prompts (left-padded together), append them as rows; returns logits `(new, kept, vocab)`:
        the last position only, or every position when `every_position` (prompt logprobs need them).

        Logits at padded positions are garbage; a row's real positions are its last `len(prompt)` ones.
        """
        import torch

        with torch.inference_mode():
            length = max(len(p) for p in prompts)
            ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts], dtype=torch.long)
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits, kv = self._forward(ids, mask, positions, None, keep=0 if every_position else 1)
            self._append(kv, mask)
        return logits

    def probe(self, token: int) -> None:
        """A one-token forward outside the batch (the idle health check): raises when the model cannot run."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            if not bool(torch.isfinite(logits).all()):
                raise RuntimeError("the model's logits are not finite")

    def _append(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        import torch

        if not self.rows:
            self.kv, self.mask = kv, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        self.kv = [(torch.cat([_left_pad(k0, length, 2), _left_pad(k1, length, 2)]),
                    torch.cat([_left_pad(v0, length, 2), _left_pad(v1, length, 2)]))
                   for (k0, v0), (k1, v1) in zip(self.kv, kv, strict=True)]
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])

    def decode(self, last_tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed each row's newest token (a list, or a `(rows,)` tensor the last step's argmax left on the
        model's device); returns next-token logits `(rows, vocab)`."""
        import torch

        with torch.inference_mode():
            if isinstance(last_tokens, torch.Tensor):
                ids = last_tokens.to(dtype=torch.long)[:, None]
            else:
                ids = torch.tensor(last_tokens, dtype=torch.long)[:, None]
            if self._cache is None:
                from transformers import DynamicCache

                self._cache = DynamicCache(ddp_cache_data=self._kv) if self._kv else DynamicCache()
            padded: dict[str, Any] = {}
            if self._padded:  # without padding, the cache length is each row's position: no mask, no positions
                positions = self._mask.sum(1, keepdim=True)  # real tokens so far = this token's position
                self._mask = torch.cat([self._mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
                padded = {"attention_mask": self._mask.to(self.device), "position_ids": positions.to(self.device)}
            else:
                self._unpadded_steps += 1
            out = self.model(input_ids=ids.to(self.device), past_key_values=self._cache, use_cache=True,
                             logits_to_keep=1, **padded)
            self._cache = out.past_key_values
            return out.logits[:, -1].float()

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop columns that are padding in every row left."""
        import torch

        if len(rows) == self.rows:
            return
        if not rows:
            self.kv, self.mask = [], torch.zeros(0, 0, dtype=torch.long)
            return
        kv = self.kv
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column some remaining row attends to
        self.mask = mask[:, start:]
        dev_index = index.to(self.device)
        self.kv = [(k.index_select(0, dev_index)[:, :, start:], v.index_select(0, dev_index)[:, :, start:])
                   for k, v in kv]
