"""Token rows: a fixed number of KV slots per (batch, head), stored at full precision or as
per-token quantised codes. Eviction stores are built from two of these (keys and values).

A row is one token of one head: ``d`` numbers, or ``d/pw`` int32 words plus ``d/G`` scales and
mins. Rows are written, gathered and read as whole tokens, so a token can be evicted on its own.
"""

from __future__ import annotations

import torch

import fxpress.kv.quant as quant


class Rows:
    def __init__(self, batch: int, heads: int, slots: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, bits: int | None, group_size: int) -> None:
        self.bits, self.group_size, self.head_dim = bits, group_size, head_dim
        shape = (batch, heads, slots)
        if bits is None:
            self.tensors = {"data": torch.zeros(*shape, head_dim, dtype=dtype, device=device)}
        else:
            if head_dim % group_size or group_size % quant.codes_per_word(bits):
                raise ValueError(
                    f"{bits}-bit rows need head_dim ({head_dim}) to be a multiple of group_size "
                    f"({group_size}), and group_size a multiple of {quant.codes_per_word(bits)}")
            self.tensors = {
                "codes": torch.zeros(*shape, head_dim // quant.codes_per_word(bits), dtype=torch.int32, device=device),
                "scale": torch.zeros(*shape, head_dim // group_size, dtype=dtype, device=device),
                "lo": torch.zeros(*shape, head_dim // group_size, dtype=dtype, device=device),
            }

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for n, t in self.tensors.items() if n != "codes")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x [B, H, n, d]`` as this store's row tensors."""
        if self.bits is None:
            return {"data": x.to(self.dtype)}
        codes, scale, lo = quant.quantize(x.unflatten(3, (-1, self.group_size)), self.bits, 4, self.dtype)
        return {"codes": quant.pack(codes.flatten(3), self.bits, 3),
                "scale": scale.squeeze(4), "lo": lo.squeeze(4)}

    def decode(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Row tensors back to float32 ``[B, H, n, d]``."""
        if self.bits is None:
            return rows["data"].float()
        codes = quant.unpack(rows["codes"], self.bits, 3).unflatten(3, (-1, self.group_size))
        return quant.dequantize(codes, rows["scale"].unsqueeze(4), rows["lo"].unsqueeze(4)).flatten(3)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.decode({n: t[:, :, start:stop] for n, t in self.tensors.items()})

    def write_range(self, start: int, x: torch.Tensor) -> None:
        for name, rows in self.encode(x).items():
            self.tensors[name][:, :, start:start + rows.shape[2]] = rows

    def write_slots(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Token ``i`` of ``x`` into slot ``slots[i]`` of every (batch, head)."""
        for name, rows in self.encode(x).items():
            self.tensors[name].index_copy_(2, slots, rows)

    def write_per_head(self, slot: torch.Tensor, x: torch.Tensor) -> None:
        """One token per (batch, head) into its own slot: ``slot [B, H]``, ``x [B, H, 1, d]``."""
        for name, rows in self.encode(x).items():
            index = slot[:, :, None, None].expand(-1, -1, 1, rows.shape[-1])
            self.tensors[name].scatter_(2, index, rows)

    def keep(self, filled: int, x: torch.Tensor, index: torch.Tensor) -> None:
        """Slots ``[0, index.shape[2])`` become rows ``index`` of (the ``filled`` stored rows, then ``x``)."""
        new = self.encode(x)
        for name, stored in self.tensors.items():
            both = torch.cat([stored[:, :, :filled], new[name]], 2)
            picked = both.gather(2, index[..., None].expand(-1, -1, -1, both.shape[-1]))
            stored[:, :, : index.shape[2]] = picked
