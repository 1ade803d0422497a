"""``tessera stats show``, ``chart`` and ``trend`` against a real broker with real releases.

Releases are made as in tests/test_broker_stats.py: three enrolled agencies submit masked shares
over TLS to a broker on a loopback port, and the broker sums and signs. Shares are built without
noise, so every released value is the exact sum and the tests know it. Each command's output is
compared with the release read back through the broker's own client and its signature checked
here, not with what the CLI's serializer says. Clamping at zero is checked on the drawn numbers.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from broker.serde import spec_to_proto
from cli import stats_render
from cli.main import app
from tessera import crypto, labels
from tessera.errors import InvalidInput, NotFound
from tessera.timestamps import to_datetime
from tessera.v1 import stats_pb2 as stats_pb
from tests.support import Agency, BackgroundBroker, enrol, make_broker
from tests.test_broker_stats import SMALL, build_share, coordinator, submit
from tests.test_node_cli import tessera

# SMALL's cells, in cell order: (safe_housing, unmet), (safe_housing, met), (medical, unmet),
# (medical, met).
MEDICAL_UNMET = SMALL.index(("medical", "unmet"))
DOCUMENT_KEYS = [
    "release_id",
    "round_id",
    "region",
    "period",
    "table",
    "dimensions",
    "mode",
    "epsilon",
    "table_epsilon",
    "alpha",
    "interval_level",
    "participants",
    "mechanism",
    "noise_scale",
    "accuracy",
    "released_at",
    "contribution_bound",
    "dropped_fraction",
    "suggested_bound",
    "cells",
    "contributions",
]
CSV_COLUMNS = [
    "release_id",
    "region",
    "period",
    "epsilon",
    "participants",
    "interval_level",
    "need_category",
    "need_status",
    "value",
    "lower",
    "upper",
]


@dataclass
class World:
    """A running broker and three agencies enrolled with it (as in tests/test_broker_stats.py)."""

    broker: BackgroundBroker
    agencies: list[Agency]


@pytest.fixture(name="world")
def world_fixture(tmp_path: Path) -> Iterator[World]:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        names = ("alder-house", "birch-clinic", "cedar-aid")
        yield World(running, [enrol(running, tmp_path, name) for name in names])
    finally:
        running.stop()


def make_release(
    broker: BackgroundBroker, agencies: list[Agency], period: str, tables: Sequence[list[int]]
) -> stats_pb.Release:
    """Run one round to its release (each agency submits its table, no noise) and return the
    release as the broker signed it, its signature checked against the broker's pinned key."""
    with coordinator(broker) as client:
        blob = client.open_round("north", period, threshold=2, epsilon=1.0, table=SMALL)
    release_id = ""
    for agency, counts in zip(agencies, tables, strict=True):
        release_id = submit(agency, build_share(agency, blob, counts, noise=False)).release_id
    assert release_id
    with coordinator(broker) as client:
        signed = client.release(release_id=release_id)
    key = agencies[0].link.broker_key
    assert bytes(signed.signer) == key
    crypto.verify(key, labels.LABEL_RELEASE, signed.body, signed.signature)
    return stats_pb.Release.FromString(signed.body)


def sums(tables: Sequence[list[int]]) -> list[int]:
    return [sum(column) for column in zip(*tables, strict=True)]


def run(broker: BackgroundBroker, *args: str) -> Result:
    home = str(broker.settings.home)
    return CliRunner().invoke(app, ["--home", home, "stats", *args], env={"COLUMNS": "200"})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


TABLES = [[1, 2, 3, 4], [2, 0, 5, 1], [0, 1, 2, 3]]  # totals 3, 3, 10, 8


def test_show_json_is_the_whole_signed_release(world: World) -> None:
    broker, agencies = world.broker, world.agencies
    release = make_release(broker, agencies, "2026-10", TABLES)
    shown = ok(run(broker, "show", "--period", "2026-10", "--format", "json"))
    document = json.loads(shown.stdout_bytes)
    assert list(document) == DOCUMENT_KEYS
    assert shown.stdout_bytes == (json.dumps(document, indent=2) + "\n").encode()
    assert document["release_id"] == release.release_id
    assert document["round_id"] == release.round_id
    assert (document["region"], document["period"]) == ("north", "2026-10")
    assert document["table"] == "needs_small"
    assert document["dimensions"] == [
        {"name": "need_category", "values": ["safe_housing", "medical"]},
        {"name": "need_status", "values": ["unmet", "met"]},
    ]
    assert document["mode"] == "private"
    assert document["epsilon"] == release.epsilon == pytest.approx(1.0)
    assert document["alpha"] == release.alpha == 0.05
    assert document["table_epsilon"] == release.table_epsilon == pytest.approx(0.8)
    assert document["contribution_bound"] == 1
    assert (document["dropped_fraction"], document["suggested_bound"]) == (
        release.dropped_fraction,
        release.suggested_bound,
    )
    bins = document["contributions"]["bins"]
    assert [b["cells"] for b in bins] == [1, 2]  # SMALL has two categories: two bins
    assert [b["value"] for b in bins] == [c.value for c in release.contributions]
    assert document["contributions"]["accuracy"] == release.contributions_accuracy
    assert document["interval_level"] == 0.95
    assert document["participants"] == release.participants == 3
    assert document["mechanism"] == release.mechanism and "threshold 2" in release.mechanism
    assert document["noise_scale"] == release.noise_scale
    assert document["accuracy"] == release.accuracy
    assert document["released_at"].endswith("Z")
    assert dt.datetime.fromisoformat(document["released_at"]) == to_datetime(release.released_at)
    assert document["cells"] == [
        {
            "coordinates": {"need_category": c.coordinates[0], "need_status": c.coordinates[1]},
            "value": c.value,
            "lower": c.lower,
            "upper": c.upper,
        }
        for c in release.cells
    ]
    assert [c["value"] for c in document["cells"]] == sums(TABLES)
    assert [tuple(c["coordinates"].values()) for c in document["cells"]] == SMALL.cells
    # The table for people: a title line naming the release, then one row per cell.
    table = ok(run(broker, "show", "--period", "2026-10")).stdout
    assert release.release_id in table and "95%" in table and "medical" in table
    with pytest.raises(NotFound):
        raise_from(run(broker, "show", "--period", "2026-10", "--region", "south"))


def raise_from(result: Result) -> None:
    """Re-raise the typed error a command ended with (cli.main maps it to an exit code)."""
    assert result.exception is not None, result.output
    raise result.exception


def test_show_csv_has_one_row_per_cell_with_the_documented_columns(world: World) -> None:
    broker, agencies = world.broker, world.agencies
    release = make_release(broker, agencies, "2026-10", TABLES)
    shown = ok(run(broker, "show", "--period", "2026-10", "-f", "csv"))
    text = shown.stdout_bytes.decode()
    assert text.endswith("\r\n")
    header, *rows = list(csv.reader(io.StringIO(text, newline="")))
    assert header == CSV_COLUMNS
    assert len(rows) == len(release.cells) == SMALL.size
    for row, cell in zip(rows, release.cells, strict=True):
        record = dict(zip(header, row, strict=True))
        assert record["release_id"] == release.release_id
        assert (record["region"], record["period"]) == ("north", "2026-10")
        assert float(record["epsilon"]) == release.epsilon
        assert int(record["participants"]) == 3
        assert float(record["interval_level"]) == 0.95
        assert (record["need_category"], record["need_status"]) == tuple(cell.coordinates)
        assert int(record["value"]) == cell.value
        assert (float(record["lower"]), float(record["upper"])) == (cell.lower, cell.upper)
    assert [int(r[header.index("value")]) for r in rows] == sums(TABLES)


def test_out_writes_the_bytes_standard_output_prints(world: World, tmp_path: Path) -> None:
    broker, agencies = world.broker, world.agencies
    make_release(broker, agencies, "2026-10", TABLES)
    for fmt in ("json", "csv"):
        printed = ok(run(broker, "show", "--period", "2026-10", "-f", fmt)).stdout_bytes
        out = tmp_path / f"release.{fmt}"
        written = ok(run(broker, "show", "--period", "2026-10", "-f", fmt, "--out", str(out)))
        assert out.read_bytes() == printed
        assert written.stdout_bytes == b""  # the file instead of standard output
        assert str(out) in written.stderr
    with pytest.raises(InvalidInput):
        raise_from(run(broker, "show", "--period", "2026-10", "--out", str(tmp_path / "t.txt")))
    assert not (tmp_path / "t.txt").exists()


def test_trend_takes_each_months_newest_release_and_shows_a_gap_as_no_release(
    world: World, tmp_path: Path
) -> None:
    broker, agencies = world.broker, world.agencies
    august = make_release(broker, agencies, "2026-08", [[0, 0, -4, 0], [0, 0, -3, 0], [0] * 4])
    older = make_release(broker, agencies, "2026-10", TABLES)
    october = make_release(broker, agencies, "2026-10", [[0, 0, 9, 0], [0, 0, 9, 0], [0] * 4])
    assert (older.released_at.seconds, older.released_at.nanos) <= (
        october.released_at.seconds,
        october.released_at.nanos,
    )
    args = ["trend", "--category", "medical", "--from", "2026-08", "--to", "2026-10"]
    png = tmp_path / "medical.png"
    document = json.loads(ok(run(broker, *args, "-f", "json", "--out", str(png))).stdout_bytes)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (document["region"], document["need_category"], document["need_status"]) == (
        "north",
        "medical",
        "unmet",
    )
    assert (document["from"], document["to"]) == ("2026-08", "2026-10")
    months = document["months"]
    assert [m["period"] for m in months] == ["2026-08", "2026-09", "2026-10"]
    assert [m["state"] for m in months] == ["released", "no release", "released"]
    for month, release in ((months[0], august), (months[2], october)):
        cell = release.cells[MEDICAL_UNMET]
        assert month["release_id"] == release.release_id
        assert (month["value"], month["lower"], month["upper"]) == (
            cell.value,
            cell.lower,
            cell.upper,
        )
        assert month["epsilon"] == release.epsilon and month["participants"] == 3
        assert month["interval_level"] == 0.95
    assert months[0]["value"] == -7 and months[2]["value"] == 18  # as released, not clamped
    gap = months[1]
    assert all(gap[k] is None for k in gap if k not in ("period", "state"))  # never 0

    # The PNG draws the same months with the clamping rule: August's interval lies below 0.
    assert august.cells[MEDICAL_UNMET].upper < 0
    drawn = stats_render.trend_bars(document)
    assert drawn[1] is None
    first, last = drawn[0], drawn[2]
    assert first is not None and last is not None
    assert (first.value, first.lower, first.upper, first.clamped) == (0, 0, 0, True)
    assert (last.value, last.lower, last.upper, last.clamped) == (
        18,
        october.cells[MEDICAL_UNMET].lower,
        october.cells[MEDICAL_UNMET].upper,
        False,
    )

    text = ok(run(broker, *args, "-f", "csv")).stdout_bytes.decode()
    header, *rows = list(csv.reader(io.StringIO(text, newline="")))
    assert header == [
        "period",
        "state",
        "release_id",
        "released_at",
        "epsilon",
        "participants",
        "interval_level",
        "value",
        "lower",
        "upper",
    ]
    assert [r[:3] for r in rows] == [
        ["2026-08", "released", august.release_id],
        ["2026-09", "no release", ""],
        ["2026-10", "released", october.release_id],
    ]
    assert rows[1][2:] == [""] * 8
    table = ok(run(broker, *args)).stdout
    assert "no release" in table and "2026-09" in table and october.release_id in table
    with pytest.raises(InvalidInput) as caught:
        raise_from(
            run(broker, "trend", "--category", "medicl", "--from", "2026-08", "--to", "2026-10")
        )
    assert "medical" in (caught.value.hint or "")


@pytest.mark.parametrize(
    ("first", "last"),
    [("2026-10", "2026-09"), ("2023-10", "2026-10"), ("2026-13", "2026-12"), ("2026-1", "2026-2")],
)
def test_trend_refuses_a_bad_range_before_calling_the_broker(
    tmp_path: Path, first: str, last: str
) -> None:
    # No broker and no credential: the range is checked first.
    args = ["trend", "--category", "medical", "--from", first, "--to", last]
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "stats", *args])
    assert isinstance(result.exception, InvalidInput), result.output


def test_a_refused_range_is_a_clear_error_with_exit_code_7(tmp_path: Path) -> None:
    done = tessera(
        tmp_path, "stats", "trend", "--category", "medical", "--from", "2023-01", "--to", "2026-01"
    )
    assert done.returncode == 7, done.stderr
    assert "37 months; a trend covers at most 36" in done.stderr
    assert "what to do:" in done.stderr and "Traceback" not in done.stderr
    assert stats_render.month_range("2024-02", "2027-01") == [
        f"{2024 + (m + 1) // 12:04d}-{(m + 1) % 12 + 1:02d}" for m in range(36)
    ]


# --- clamping at zero -----------------------------------------------------------------------


def negative_release() -> stats_pb.Release:
    """A release whose unmet cells are negative, one with its whole interval below 0."""
    release = stats_pb.Release(
        release_id="r-neg", table=spec_to_proto(SMALL), region="north", period="2026-10"
    )
    cells = {
        ("safe_housing", "unmet"): (-6, -9.0, -3.0),  # entirely below 0
        ("safe_housing", "met"): (-1, -4.0, 2.0),
        ("medical", "unmet"): (-1, -4.0, 2.0),  # straddles 0
        ("medical", "met"): (3, -1.0, 7.0),
    }
    for coordinates in SMALL.cells:
        value, lower, upper = cells[coordinates]
        release.cells.add(coordinates=coordinates, value=value, lower=lower, upper=upper)
    return release


def test_charts_clamp_value_and_interval_together(tmp_path: Path) -> None:
    rows = stats_render.release_rows(negative_release())
    bars = stats_render.unmet_bars(rows)
    assert [(b.label, b.value, b.lower, b.upper, b.clamped) for b in bars] == [
        ("safe_housing", 0, 0, 0, True),
        ("medical", 0, 0, 2, True),
    ]
    arms = stats_render.error_bars(bars)
    assert (arms.heights, arms.below, arms.above) == ([0, 0], [0, 0], [0, 2])
    text = stats_render.terminal_chart(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["safe_housing", "0", "[0,", "0]", "*"]
    assert lines[1].split() == ["medical", "0", "[0,", "2]", "*"]
    assert lines[2] == stats_render.CLAMP_NOTE and "raised to 0" in lines[2]
    assert "-" not in "".join(lines[:2])  # no negative number is drawn
    png = tmp_path / "negative.png"
    stats_render.png_chart(rows, "unmet needs", png)  # matplotlib refuses negative arms
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The documents keep the numbers as released.
    document = stats_render.release_document(negative_release())
    assert [c["value"] for c in document["cells"]] == [-6, -1, -1, 3]


@pytest.mark.parametrize("accuracy", [0.0, 0.5, 3.0, 40.0])
def test_a_drawn_value_always_lies_inside_its_drawn_interval(accuracy: float) -> None:
    for value in range(-60, 61, 3):
        lower, upper = value - accuracy, value + accuracy
        bar = stats_render.clamp_at_zero("x", value, lower, upper)
        assert (bar.lower, bar.upper) == (max(0.0, lower), max(0.0, upper))
        assert bar.value == min(max(0.0, value), bar.upper)
        assert 0 <= bar.lower <= bar.value <= bar.upper
        assert bar.clamped == (lower < 0)
        (below,), (above,) = (
            stats_render.error_bars([bar]).below,
            stats_render.error_bars([bar]).above,
        )
        assert below >= 0 and above >= 0
    # Even a malformed cell (value outside its interval) draws inside its arms.
    odd = stats_render.clamp_at_zero("x", -5, 2.0, 10.0)
    assert 0 <= odd.lower <= odd.value <= odd.upper


def test_chart_of_a_real_release_below_zero(world: World, tmp_path: Path) -> None:
    broker, agencies = world.broker, world.agencies
    tables = [[-30, 0, 1, 0], [-30, 0, 1, 0], [-30, 0, 1, 0]]
    release = make_release(broker, agencies, "2026-07", tables)
    below = release.cells[SMALL.index(("safe_housing", "unmet"))]
    assert below.value == -90 and below.upper < 0
    png = tmp_path / "unmet.png"
    charted = ok(run(broker, "chart", "--period", "2026-07", "--out", str(png))).stdout
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    drawn = {
        line.split()[0]: [word for word in line.split()[1:] if set(word) != {"#"}]
        for line in charted.splitlines()[2:4]
    }
    assert drawn["safe_housing"] == ["0", "[0,", "0]", "*"]  # released -90 in [-93, -87]
    medical = release.cells[MEDICAL_UNMET]
    assert medical.value == 3 and medical.lower < 0 < medical.upper
    # The lower end is raised to 0, the value is not: clamped, so marked *.
    assert drawn["medical"] == ["3", "[0,", f"{medical.upper:g}]", "*"]
    assert stats_render.CLAMP_NOTE in charted
    shown = json.loads(ok(run(broker, "show", "--period", "2026-07", "-f", "json")).stdout_bytes)
    assert shown["cells"][0]["value"] == -90 and shown["cells"][MEDICAL_UNMET]["upper"] == (
        medical.upper
    )


def test_a_trend_without_any_release_is_all_gaps_and_still_draws(tmp_path: Path) -> None:
    months = stats_render.month_range("2026-11", "2027-02")
    assert months == ["2026-11", "2026-12", "2027-01", "2027-02"]
    trend = stats_render.trend_document("north", "medical", "unmet", [(m, None) for m in months])
    assert [m["state"] for m in trend["months"]] == ["no release"] * 4
    assert all(m["value"] is None for m in trend["months"])
    assert stats_render.trend_bars(trend) == [None] * 4
    rows = stats_render.trend_csv(trend).splitlines()
    assert rows[1] == "2026-11,no release,,,,,,,,"
    png = tmp_path / "gaps.png"
    stats_render.trend_png(trend, png)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
