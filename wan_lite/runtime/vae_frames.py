"""Decoded video -> the uint8 frames the mp4 writer takes, without a float32 copy of the video.

The official pipeline truncates the float32 video in [-1, 1] to uint8 (`to_uint8`). A tiled
decode adds each tile's weighted pixels into a float32 video first (tiled_vae), which at
TI2V-5B 1280x704x121 is 1.3 GB of RAM besides the 0.33 GB of frames. `FrameAssembly` makes the
same frames bit for bit from the tiles directly: a pixel that only one tile covers is final as
soon as that tile's part arrives (0 + x is x) and is truncated there and then; only the pixels of
the overlaps, where two or four tiles add up, wait in float32 strips, added in the tiles' order
as the float32 video would add them, and are truncated once all tiles are in. The strips are the
overlap rows across the whole width and the overlap columns across the rest of the height.
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, n, h, w] in [-1, 1] -> uint8 [n, h, w, 3] by truncation, like the official save_video."""
    return ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0)


def video_to_frames(video: torch.Tensor, chunk: int = 16) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (`to_uint8`). Computed where the video is,
    `chunk` frames at a time (a video on the GPU sends a quarter of its float32 bytes to the CPU,
    and no whole-video temporaries are made)."""
    c, f, h, w = video.shape
    out = torch.empty((f, h, w, c), dtype=torch.uint8)
    for i in range(0, f, chunk):
        out[i : i + chunk].copy_(to_uint8(video[:, i : i + chunk]))
    return out.numpy()


def _runs(start: int, stop: int, shared: np.ndarray) -> list[tuple[int, int, bool]]:
    """[start, stop) cut where `shared` (bool per index) changes: (a, b, shared) pieces."""
    out, a = [], start
    for i in range(start + 1, stop + 1):
        if i == stop or shared[i] != shared[a]:
            out.append((a, i, bool(shared[a])))
            a = i
    return out


def _shared(size: int, supports: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per index along one axis: covered by more than one of `supports` ([a, b) pixel ranges),
    and its position among the shared indices."""
    count = np.zeros(size, dtype=np.int32)
    for a, b in supports:
        count[a:b] += 1
    shared = count > 1
    return shared, np.cumsum(shared) - 1


class FrameAssembly:
    """uint8 frames [F, H, W, 3] from weighted float32 tile parts, equal to `to_uint8` of their
    float32 sum. `rows` / `cols`: each tile row's / column's pixel range with nonzero weight. Parts
    arrive through `add` (on the CPU), in any order of tiles, but for a given pixel in the order
    the float32 video would add them; `frames()` gives the result once all are in."""

    def __init__(self, frames: int, height: int, width: int, rows: list[tuple[int, int]],
                 cols: list[tuple[int, int]]) -> None:
        self.out = torch.empty((frames, height, width, 3), dtype=torch.uint8)
        self.row_shared, self.row_at = _shared(height, rows)
        self.col_shared, self.col_at = _shared(width, cols)
        n_rows, n_cols = int(self.row_shared.sum()), int(self.col_shared.sum())
        # overlap rows over the whole width; overlap columns over the other rows (allocated for
        # every row, only those are used: simpler indexing for little memory)
        self.by_row = torch.zeros((3, frames, n_rows, width)) if n_rows else None
        self.by_col = torch.zeros((3, frames, height, n_cols)) if n_cols else None

    @property
    def strip_bytes(self) -> int:
        return sum(t.numel() * 4 for t in (self.by_row, self.by_col) if t is not None)

    def add(self, frame: int, rows: slice, cols: slice, part: torch.Tensor) -> None:
        """A tile's weighted pixels [1, 3, n, y, x] (float32, CPU) for video frames frame..frame+n,
        pixel rows `rows`, columns `cols` (slices with explicit start and stop)."""
        p = part[0]
        f = slice(frame, frame + p.shape[1])
        for a, b, row_shared in _runs(rows.start, rows.stop, self.row_shared):
            src = p[:, :, a - rows.start : b - rows.start]
            if row_shared:
                at = int(self.row_at[a])
                self.by_row[:, f, at : at + b - a, cols].add_(src)
                continue
            for c, d, col_shared in _runs(cols.start, cols.stop, self.col_shared):
                piece = src[..., c - cols.start : d - cols.start]
                if col_shared:
                    at = int(self.col_at[c])
                    self.by_col[:, f, a:b, at : at + d - c].add_(piece)
                else:
                    self.out[f, a:b, c:d].copy_(to_uint8(piece))

    def frames(self) -> torch.Tensor:
        """The frames, the overlaps truncated now; the strips are freed."""
        height, width = self.out.shape[1:3]
        if self.by_row is not None:
            for a, b, shared in _runs(0, height, self.row_shared):
                if shared:
                    at = int(self.row_at[a])
                    self.out[:, a:b].copy_(to_uint8(self.by_row[:, :, at : at + b - a]))
        if self.by_col is not None:
            for a, b, row_shared in _runs(0, height, self.row_shared):
                if row_shared:
                    continue
                for c, d, shared in _runs(0, width, self.col_shared):
                    if shared:
                        at = int(self.col_at[c])
                        self.out[:, a:b, c:d].copy_(to_uint8(self.by_col[:, :, a:b, at : at + d - c]))
        self.by_row = self.by_col = None
        return self.out
