"""bench/probe_cost.py's pure parts: the docs section it renders from its JSON, and where that section goes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import probe_cost  # noqa: E402


def _stats(wall: float, cpu: float) -> dict[str, Any]:
    return {
        "runs": 5,
        "wall": {"median_ms": wall, "max_ms": wall * 2, "min_ms": wall / 2},
        "cpu": {"median_ms": cpu, "max_ms": cpu * 2, "min_ms": cpu / 2},
    }


def _doc(hc_wall: float, hc_cpu: float) -> dict[str, Any]:
    return {
        "started_at": "2026-11-30 20:00:00 UTC",
        "machine": {"load_average_at_start": [1.0, 1.0, 1.0], "python": "3.11.7"},
        "load_average_at_end": [2.0, 1.0, 1.0],
        "settings": {"runs": 5, "baseline": "abc1234"},
        "interpreter": {"editable": _stats(20.0, 15.0), "wheel": _stats(10.0, 9.0)},
        "results": {
            "before/editable/healthcheck": _stats(300.0, 250.0),
            "before/wheel/healthcheck": _stats(30.0, 20.0),
            "current/editable/healthcheck": _stats(hc_wall, hc_cpu),
            "current/wheel/healthcheck": _stats(15.0, 12.0),
            "current/editable/--help": _stats(150.0, 140.0),
        },
    }


def test_section_names_the_target_verdict_and_both_trees_and_installs() -> None:
    met = probe_cost.render_section(_doc(35.0, 25.0))
    assert met.startswith(probe_cost.SECTION + "\n")
    editable, wheel = probe_cost.INSTALLS["editable"], probe_cost.INSTALLS["wheel"]
    assert f"(median); {editable}: met (35.0 ms wall, 25.0 ms CPU); {wheel}: met (15.0 ms wall, 12.0 ms CPU)." in met
    assert f"| `rabbitproxy healthcheck` | before | {editable} | 300.0 | 600.0 | 250.0 | 500.0 |" in met
    assert f"| `rabbitproxy healthcheck` | before | {wheel} | 30.0 | 60.0 | 20.0 | 40.0 |" in met
    assert f"| `rabbitproxy --help` | current | {editable} | 150.0 |" in met
    assert f"{editable}: 20.0 ms wall, 15.0 ms CPU; {wheel}: 10.0 ms wall, 9.0 ms CPU." in met
    assert "Load average at start [1.0, 1.0, 1.0], at the end [2.0, 1.0, 1.0]" in met
    assert "`abc1234`" in met
    assert f"{editable}: **not met** (45.0 ms wall, 25.0 ms CPU)" in probe_cost.render_section(_doc(45.0, 25.0))


def test_update_docs_inserts_before_the_profile_notes_then_replaces(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## TCP relay\n\ntable\n\n## Profile and data-path work\n\nnotes\n")
    probe_cost.update_docs("## Probe cost\n\nfirst", doc)
    probe_cost.update_docs("## Probe cost\n\nsecond", doc)
    text = doc.read_text()
    assert text == (
        "# Benchmarks\n\n## TCP relay\n\ntable\n\n## Probe cost\n\nsecond\n\n## Profile and data-path work\n\nnotes\n"
    )
