"""One reader of the Prometheus text format, so every test reads /metrics the way Prometheus does."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample in an exposition: (sample name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample, by its full name and exact label set; a missing sample fails the test."""
    got = samples(text)
    key = (name, tuple(sorted(labels.items())))
    if key not in got:
        raise AssertionError(f"no sample {name}{labels} in the metrics")
    return got[key]
