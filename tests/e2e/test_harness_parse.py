"""parse_process_summary against lines Bazel 4.2.3 printed on this machine."""

from __future__ import annotations

import pytest

from tests.e2e.harness import parse_process_summary

# Each line was printed by Bazel 4.2.3 (Debian bazel-bootstrap) building tests/e2e/workspace.
OBSERVED = [
    # cold `test //...`, default strategy
    (
        "INFO: 29 processes: 11 internal, 18 linux-sandbox.",
        {"internal": 11, "linux-sandbox": 18},
    ),
    # --spawn_strategy=local (and standalone)
    ("INFO: 29 processes: 11 internal, 18 local.", {"internal": 11, "local": 18}),
    # after `clean`, with --disk_cache: disk cache hits are reported as remote cache hits
    (
        "INFO: 29 processes: 18 remote cache hit, 11 internal.",
        {"remote cache hit": 18, "internal": 11},
    ),
    (
        "INFO: 29 processes: 11 internal, 13 local, 5 processwrapper-sandbox.",
        {"internal": 11, "local": 13, "processwrapper-sandbox": 5},
    ),
    # a rebuild with nothing to do
    ("INFO: 1 process: 1 internal.", {"internal": 1}),
    # //fail:fail
    ("INFO: 2 processes: 2 internal.", {"internal": 2}),
    # analysis failed
    ("INFO: 0 processes.", {}),
]


@pytest.mark.parametrize(("line", "expected"), OBSERVED)
def test_observed_lines(line: str, expected: dict[str, int]) -> None:
    assert parse_process_summary(line) == expected


def test_uses_the_last_summary_in_full_output() -> None:
    output = "\n".join(
        [
            "INFO: Analyzed 11 targets (25 packages loaded, 111 targets configured).",
            "INFO: Found 9 targets and 2 test targets...",
            "INFO: Elapsed time: 4.176s, Critical Path: 0.51s",
            "INFO: 3 processes: 1 internal, 2 linux-sandbox.",
            "INFO: Build completed successfully, 3 total actions",
            "INFO: 29 processes: 11 internal, 18 remote.",
            "INFO: Build completed successfully, 29 total actions",
        ]
    )
    assert parse_process_summary(output) == {"internal": 11, "remote": 18}


def test_tolerates_colour_codes_and_carriage_returns() -> None:
    line = "\x1b[32mINFO: \x1b[0m5 processes: 2 remote cache hit, 3 remote.\r\n"
    assert parse_process_summary(line) == {"remote cache hit": 2, "remote": 3}


def test_no_summary_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="no 'INFO: N processes'"):
        parse_process_summary("INFO: Build completed successfully, 29 total actions\n")


def test_counts_must_add_up() -> None:
    with pytest.raises(ValueError, match="do not add up"):
        parse_process_summary("INFO: 30 processes: 11 internal, 18 local.")
