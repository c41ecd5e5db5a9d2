"""The live terminal view of a run (rich) and its closing summary table.

Like Flover's console: a progress bar, a histogram of in-flight requests over
iterations, and "request i added / finished" lines.
"""

from __future__ import annotations

import collections
import contextlib
import time

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from flover_jax.request import Request
from flover_jax.scheduler import Scheduler

BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[int], top: int) -> str:
    """One character per value, height proportional to value / top; any value above 0 shows."""
    top, highest = max(top, 1), len(BLOCKS) - 1
    return "".join(BLOCKS[min(highest, max(v > 0, round(v / top * highest)))] for v in values)


def downsample(values: list[int], width: int) -> list[int]:
    """At most `width` values: the maximum of each of `width` equal runs."""
    if len(values) <= width:
        return values
    edges = [round(i * len(values) / width) for i in range(width + 1)]
    return [max(values[a:b]) for a, b in zip(edges, edges[1:])]


class LiveView:
    """Use as a context manager around `Engine.run(..., on_event=view.event,
    on_iteration=view.iteration)`."""

    def __init__(self, total: int, capacity: int, title: str, console: Console | None = None,
                 log_lines: int = 8, width: int = 64) -> None:
        self.capacity, self.title, self.width = capacity, title, width
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("requests", total=total)
        self.log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.inflight: list[int] = []
        self.tokens = 0
        self.iterations = 0
        self.start = time.perf_counter()
        self._live = Live(self._render(), console=self.console, refresh_per_second=8)

    def __enter__(self) -> LiveView:
        self.start = time.perf_counter()
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)
        self.console.print()

    def event(self, kind: str, request: Request) -> None:
        if kind == "finished":
            self.progress.advance(self.task)
            self.tokens += len(request.token_ids)
            why = f" ({request.error})" if request.error else ""
            self.log.append(
                f"request {request.request_id} finished: {request.finish_reason.value}{why}, "
                f"{len(request.token_ids)} tokens"
            )
        else:
            self.log.append(f"request {request.request_id} added ({len(request.prompt_ids)}-token prompt)")

    def iteration(self, scheduler: Scheduler) -> None:
        self.iterations += 1
        self.inflight.append(scheduler.num_running)
        self._live.update(self._render())

    def _render(self) -> Panel:
        elapsed = time.perf_counter() - self.start
        live_tokens = self.tokens
        status = Text.assemble(
            ("iteration ", "dim"), (f"{self.iterations}", "bold"),
            ("   in flight ", "dim"), (f"{self.inflight[-1] if self.inflight else 0}", "bold"),
            (f"/{self.capacity}", "dim"),
            ("   finished tokens/s ", "dim"), (f"{live_tokens / max(elapsed, 1e-9):.1f}", "bold"),
        )
        histogram = Text.assemble(
            ("in flight over iterations ", "dim"),
            (sparkline(downsample(self.inflight, self.width), self.capacity), "cyan"),
        )
        log = Text("\n".join(self.log), style="green")
        return Panel(Group(self.progress, status, histogram, log), title=self.title)


def summary_table(summary: dict, title: str = "summary") -> Table:
    """Makespan, throughput, TTFT and latency of a run (the dict from metrics.summarize)."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("policy", lambda: summary["policy"]),
        ("requests", lambda: f"{summary['num_requests']} ({summary['errors']} errors)"),
        ("makespan", lambda: f"{summary['makespan_s']:.2f} s"),
        ("output tokens", lambda: f"{summary['output_tokens']}"),
        ("output tokens/s", lambda: f"{summary['output_tokens_per_s']:.1f}"),
        ("TTFT mean / p50 / p99", lambda: _ms(summary["ttft_s"])),
        ("TPOT mean / p50 / p99", lambda: _ms(summary["tpot_s"])),
        ("ITL mean / p50 / p99", lambda: _ms(summary["itl_s"])),
        ("latency mean / p50 / p99", lambda: _ms(summary["e2e_s"])),
        ("iterations", lambda: f"{summary['iterations']}"),
        ("mean in flight", lambda: f"{summary['mean_inflight']:.2f}"),
        ("compactions (moves)", lambda: f"{summary['compactions']} ({summary['moves']})"),
        ("attention / matmul ops", lambda: f"{summary['ops']['attention']} / "
                                           f"{summary['ops']['matmul']} ({summary['ops']['chosen_by']})"),
    ]
    for name, value in rows:
        with contextlib.suppress(KeyError):  # a server's bench has no engine counters
            table.add_row(name, value())
    return table


def _ms(d: dict) -> str:
    if d["mean"] is None:
        return "-"
    return f"{d['mean'] * 1e3:.0f} / {d['p50'] * 1e3:.0f} / {d['p99'] * 1e3:.0f} ms"
