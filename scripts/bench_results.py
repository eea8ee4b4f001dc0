"""Where the benchmarks write their figures (one section per run, appended to benchmarks/RESULTS.md), and the
percentile they all quote."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank); NaN when there are none."""
    data = sorted(values)
    return data[min(len(data) - 1, round(q * (len(data) - 1)))] if data else float("nan")


def append_results(path: str | Path, *sections: str) -> Path:
    """Append ``sections`` (a heading and paragraph, a table...) to the results file, creating it if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    body = "\n".join(section.rstrip("\n") + "\n" for section in sections)
    path.write_text(existing.rstrip("\n") + "\n\n" + body, encoding="utf-8")
    print(f"\nappended to {path}")
    return path


def publish(path: str | Path | None, *sections: str) -> None:
    """Print ``sections``, then append them to the results file unless ``path`` is None (``--no-write``)."""
    print()
    print("\n".join(sections))
    if path is not None:
        append_results(path, *sections)
