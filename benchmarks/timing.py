"""How the benchmarks measure: interleaved rounds, medians, the machine and its load, and their docs sections.

Every benchmark on a shared machine runs its contenders in rounds, one after the other within a
round and in a rotated order from round to round, so that load from other processes hits all of
them alike; it reports the median over rounds and ratios of medians measured in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Throughput:
    """Images processed in `wall_s` seconds of wall-clock time, using `cpu_s` seconds of CPU time."""

    images: int
    wall_s: float
    cpu_s: float

    @property
    def per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        """Images per CPU-second: steadier than wall time when other jobs share the cores."""
        return self.images / self.cpu_s if self.cpu_s > 0 else float("nan")

    def __format__(self, spec: str) -> str:
        return format(self.per_s, spec or ".4g")


def interleaved_rounds(
    contenders: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[float]], list[float]]:
    """Run every contender once per round, the starting one rotated each round.

    Returns each contender's measurements (whatever its callable returns: seconds, a Throughput)
    and the 1-minute load average at the end of each round.
    """
    names = list(contenders)
    results: dict[str, list[float]] = {name: [] for name in names}
    loads = []
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(contenders[name]())
        loads.append(load_average())
        if progress is not None:
            summary = ", ".join(f"{name} {results[name][-1]:.4g}" for name in names)
            progress(f"round {round_index + 1}/{rounds}: {summary} (load {loads[-1]:.2f})")
    return results, loads


def median(values) -> float:
    return float(statistics.median(values))


def spread(values) -> str:
    """`min-max` of a series, for the tables' noise column."""
    return f"{min(values):.4g}-{max(values):.4g}"


def load_average() -> float:
    """The 1-minute load average (how many runnable processes shared the cores)."""
    return os.getloadavg()[0]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu") -> str:
    """CPU model, core count, torch version, and the GPU's name when `device` is CUDA."""
    text = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    device = torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        text += f", {properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    return text


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M")


def cpu_seconds() -> float:
    """CPU time used so far by this process (all threads) and its live child processes (e.g. DataLoader workers)."""
    total = time.process_time()
    for pid in child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return total


def child_pids() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def add_output_arguments(parser) -> None:
    """--tiny, --json, --out, --no-write: the options every benchmark script shares."""
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run that checks the script works")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--out", type=Path, help=f"Markdown file to update (default: {DOCS.name}; none with --tiny)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")


def markdown_target(args) -> Path | None:
    """Where the section goes: --out, else docs/benchmarks.md; nowhere with --no-write or for --tiny without --out."""
    if args.no_write or (args.tiny and args.out is None):
        return None
    return args.out or DOCS


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section that starts with the heading `title` in a Markdown file (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if title in text:
        head, rest = text.split(title, 1)
        following = rest.find("\n## ")
        tail = rest[following + 1 :] if following >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
