"""Decoding trajectories: what happened at which step to each generated position, and a picture of it.

`Sampler(...)(..., record_trajectory=True).trajectory` is a `Trajectory`; `plot_trajectory` draws one
row of it as a PNG heatmap (steps down, positions across). A masked-diffusion pipeline called with
`trajectory=True` returns one too, and `mmdlm trajectory --model DIR --prompt ... --out x.png` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Event codes of `Trajectory.events`.
NOTHING, COMMIT, REMASK, EDIT = 0, 1, 2, 3


@dataclass
class Trajectory:
    """events [B, T, G] int8: at forward t, generated position g of row b was committed (COMMIT, from a
    mask), masked again (REMASK), replaced by another token (EDIT), or left alone (NOTHING, also for rows
    that had left the batch). T counts the forwards of the run; positions a stopping rule filled (the
    EOS tail of eos_early_stop) have no event."""

    events: torch.Tensor

    @property
    def commit_step(self) -> torch.LongTensor:
        """[B, G] the forward that wrote each position's final token (its last commit or edit); -1 if none."""
        wrote = (self.events == COMMIT) | (self.events == EDIT)
        last = wrote.shape[1] - 1 - wrote.flip(1).int().argmax(1)
        return torch.where(wrote.any(1), last, -1)

    @property
    def revisions(self) -> torch.LongTensor:
        """[B, G] how often each position's token was masked again or replaced."""
        return ((self.events == REMASK) | (self.events == EDIT)).sum(1)

    def decoded(self) -> torch.BoolTensor:
        """[B, T, G] whether each position holds a token after each forward."""
        state = torch.zeros_like(self.events[:, 0], dtype=torch.bool)
        out = []
        for t in range(self.events.shape[1]):
            ev = self.events[:, t]
            state = torch.where(ev == REMASK, False, state | (ev == COMMIT) | (ev == EDIT))
            out.append(state)
        return torch.stack(out, 1) if out else torch.zeros_like(self.events, dtype=torch.bool)

    @staticmethod
    def gather(parts: Sequence[tuple[Trajectory, Sequence[int] | None]], batch: int) -> Trajectory:
        """One trajectory for `batch` rows from chunks: (trajectory, the rows it holds, None = 0..b-1).
        Chunks that ran fewer forwards are padded with NOTHING; rows in no chunk hold NOTHING."""
        steps = max((t.events.shape[1] for t, _ in parts), default=0)
        width = max((t.events.shape[2] for t, _ in parts), default=0)
        events = torch.zeros(batch, steps, width, dtype=torch.int8)
        for traj, rows in parts:
            rows = list(range(traj.events.shape[0])) if rows is None else list(rows)
            events[rows, : traj.events.shape[1], : traj.events.shape[2]] = traj.events.cpu()
        return Trajectory(events)


class TrajectoryRecorder:
    """A step callback (step, canvas, info) that records each forward's events; `result()` gives the
    `Trajectory`. info's "transfer", "remasked" and "edited" are the current block of the active rows (each
    row's own block, at its "block_start", when that is a tensor)."""

    def __init__(self, batch_size: int, gen_length: int):
        self.batch_size, self.gen_length = batch_size, gen_length
        self.steps: list[torch.Tensor] = []

    def __call__(self, step, canvas, info):
        transfer = info["transfer"]
        codes = COMMIT * transfer.to(torch.int8)
        for code, key in ((REMASK, "remasked"), (EDIT, "edited")):
            if info.get(key) is not None:
                codes += code * info[key].to(torch.int8)
        # the block's first answer position (blocks may differ in length: block_alignment="start"), one per row
        # when rows decode blocks of their own (row_blocks="independent")
        start = info.get("block_start")
        lo = info["block"] * transfer.shape[1] if start is None else start - (canvas.shape[1] - self.gen_length)
        rows = info["rows"].cpu()[:, None].expand(-1, transfer.shape[1])
        columns = (torch.as_tensor(lo).cpu().reshape(-1, 1) + torch.arange(transfer.shape[1])).expand_as(rows)
        inside = (columns >= 0) & (columns < self.gen_length)  # a shorter block's window may reach into the prompt
        events = torch.zeros(self.batch_size, self.gen_length, dtype=torch.int8)
        events[rows[inside], columns[inside]] = codes.cpu()[inside]
        self.steps.append(events)

    def result(self) -> Trajectory:
        if not self.steps:
            return Trajectory(torch.zeros(self.batch_size, 0, self.gen_length, dtype=torch.int8))
        return Trajectory(torch.stack(self.steps, 1))


def plot_trajectory(trajectory: Trajectory, path, row: int = 0, labels: Sequence[str] | None = None,
                    title: str | None = None) -> None:
    """Write one row of a trajectory as a PNG heatmap: a line per forward (top to bottom), a column per
    generated position; pale cells hold a token, dark ones are this forward's commits, red ones its
    remasks, orange ones its edits. `labels` (one string per position, e.g. the final tokens) name the
    columns."""
    import matplotlib  # noqa: PLC0415 - only for pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.colors import ListedColormap  # noqa: PLC0415

    events = trajectory.events[row].long()
    picture = trajectory.decoded()[row].long()  # 0 masked, 1 holds a token
    picture = torch.where(events > NOTHING, events + 1, picture)  # 2 commit, 3 remask, 4 edit
    colors = ListedColormap(["#ffffff", "#c6dbef", "#08519c", "#d62728", "#ff7f0e"])
    steps, width = picture.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * width + 1.5), max(2.5, 0.22 * steps + 1.2)))
    ax.imshow(picture.numpy(), cmap=colors, vmin=0, vmax=4, aspect="auto", interpolation="nearest")
    ax.set_xlabel("generated position")
    ax.set_ylabel("forward")
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(1, width)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, steps)], minor=True)
    ax.grid(which="minor", color="#eeeeee", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i)) for i in (1, 2, 3, 4)]
    ax.legend(handles, ["holds a token", "committed", "masked again", "edited"], loc="upper center",
              bbox_to_anchor=(0.5, -0.28 if labels is not None else -0.15), ncol=4, fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
