"""What ``kvsync demo`` shows: a live view on a terminal, a plain summary
otherwise.

On a terminal the view is a ``rich`` table of the engines (natural order:
``engine-2`` before ``engine-10``), redrawn in place, cut to the terminal's
height and width. When stdout is a file or a pipe nothing is redrawn; only
the final summary is written, as a few plain lines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from kvsync._core import IndexStats, WorkerStatus


@dataclass
class Fleet:
    """Hit accounting of one routing policy over the same requests."""

    name: str
    hit: int = 0
    blocks: int = 0
    load: list[int] = field(default_factory=list)

    def rate(self) -> float:
        return self.hit / self.blocks if self.blocks else 0.0


@dataclass
class Snapshot:
    """Everything one frame of the view shows."""

    done: int
    total: int
    elapsed: float
    index: IndexStats
    status: Mapping[str, WorkerStatus]
    fleets: Sequence[Fleet]


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders digit runs by value: engine-2 < engine-10."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", name)
        if part
    )


def _headline(s: Snapshot) -> Text:
    return Text(
        f"kvsync demo  {s.done}/{s.total} requests  {s.elapsed:.1f} s  "
        f"index {s.index['blocks']} blocks {s.index['memory_bytes'] / 1e6:.1f} MB  "
        f"{s.index['holdings']} holdings",
        style="bold",
        no_wrap=True,
        overflow="ellipsis",
    )


def _hit_line(fleets: Sequence[Fleet]) -> Text:
    return Text(
        "hit rate  " + "   ".join(f"{f.name} {100 * f.rate():5.1f}%" for f in fleets),
        no_wrap=True,
        overflow="ellipsis",
    )


def _engine_table(s: Snapshot, rows: int) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    names = sorted(s.status, key=natural_key)
    # Names and states keep their width; the counters give way on a narrow terminal.
    name_width = min(max((len(n) for n in names), default=6), 24)
    for name, justify, min_width in (
        ("engine", "left", name_width),
        ("state", "left", 8),
        ("seq", "right", None),
        ("batches", "right", None),
        ("events/s", "right", None),
        ("gaps", "right", None),
        ("lost", "right", None),
    ):
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]
            min_width=min_width,
            no_wrap=True,
            overflow="ellipsis",
        )
    shown = names if len(names) <= rows else names[: max(rows - 1, 0)]
    for wid in shown:
        st = s.status[wid]
        rate = st.events / s.elapsed if s.elapsed > 0 else 0.0
        style = {"live": "green", "degraded": "yellow", "disconnected": "red"}.get(st.state, "")
        table.add_row(
            wid,
            Text(st.state, style=style),
            "-" if st.last_seq is None else str(st.last_seq),
            str(st.batches),
            f"{rate:.0f}",
            str(st.gaps),
            str(st.lost_batches),
        )
    hidden = names[len(shown) :]
    if hidden:
        states: dict[str, int] = {}
        for wid in hidden:
            states[s.status[wid].state] = states.get(s.status[wid].state, 0) + 1
        what = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        table.add_row(f"+{len(hidden)} more", what, "", "", "", "", "")
    return table


# Lines the view needs besides the engine rows: headline, blank, table
# header and its rule, blank, hit-rate line.
_OVERHEAD = 5


def render(s: Snapshot, height: int) -> RenderableType:
    """One frame, at most ``height`` lines (it keeps the headline and the
    column headers and folds the engines that do not fit into one row)."""
    rows = max(height - _OVERHEAD, 1)
    return Group(_headline(s), Text(""), _engine_table(s, rows), _hit_line(s.fleets))


class LiveView:
    """The in-place terminal view (``rich.live.Live``)."""

    def __init__(self, console: Console) -> None:
        from rich.live import Live

        self.console = console
        self.live = Live(console=console, auto_refresh=False, vertical_overflow="crop")

    def __enter__(self) -> LiveView:
        self.live.start()
        return self

    def update(self, s: Snapshot) -> None:
        self.live.update(render(s, self.console.size.height), refresh=True)

    def __exit__(self, *exc: object) -> None:
        self.live.stop()


def _engines(n: int) -> str:
    return "1 engine" if n == 1 else f"{n} engines"


def summary_lines(s: Snapshot, consistent: bool | None, interrupted: bool) -> list[str]:
    """The final summary as plain lines (also what a pipe gets)."""
    engines = len(s.status)
    head = (
        f"kvsync demo: interrupted after {s.done} of {s.total} requests "
        f"({s.elapsed:.1f} s); all {_engines(engines)} stopped"
        if interrupted
        else f"kvsync demo: {s.done} requests routed over {_engines(engines)} in {s.elapsed:.1f} s"
    )
    lines = [head, f"  {'routing':<8} {'hit rate':>9} {'cached blocks':>14} {'prompt blocks':>14}"]
    for f in s.fleets:
        lines.append(f"  {f.name:<8} {100 * f.rate():8.1f}% {f.hit:>14} {f.blocks:>14}")
    st = s.status.values()
    lines.append(
        f"  {sum(x.events for x in st)} block events followed, "
        f"{sum(x.gaps for x in st)} gaps, {sum(x.lost_batches for x in st)} batches lost; "
        f"index {s.index['memory_bytes'] / 1e6:.1f} MB"
    )
    if consistent is not None:
        verdict = "yes" if consistent else "NO (an engine's cache differs from the index)"
        lines.append(f"  index equals the engines' caches: {verdict}")
    return lines


def print_summary(
    out: IO[str], console: Console | None, s: Snapshot, consistent: bool | None, interrupted: bool
) -> None:
    """Plain lines on a pipe; on a terminal the same facts as a table."""
    lines = summary_lines(s, consistent, interrupted)
    if console is None:
        out.write("\n".join(lines) + "\n")
        out.flush()
        return
    table = Table(box=box.SIMPLE_HEAD, title=None, show_edge=False)
    for name in ("routing", "hit rate", "cached blocks", "prompt blocks", "requests/engine"):
        table.add_column(name, justify="left" if name == "routing" else "right")
    for f in s.fleets:
        spread = f"{min(f.load)}-{max(f.load)}" if f.load else "-"
        table.add_row(f.name, f"{100 * f.rate():.1f}%", str(f.hit), str(f.blocks), spread)
    console.print(Text(lines[0], style="bold"))
    console.print(table)
    for line in lines[len(s.fleets) + 2 :]:
        console.print(line.strip(), highlight=False)
