"""The request log behind /metrics and the TUI."""

from __future__ import annotations

from server.telemetry import RequestLog, RequestRecord


def test_totals_keep_counting_after_old_records_roll_off() -> None:
    log = RequestLog(maxlen=3)
    for i in range(5):
        log.record(
            RequestRecord(
                at=0,
                method="POST",
                path="/v1/chat/completions",
                model="m",
                status=200,
                prompt_tokens=10,
                cached_tokens=i,
                latency_ms=100.0 * (i + 1),
                ttft_ms=40.0,
            )
        )
    log.record(RequestRecord(at=0, method="POST", path="/v1/x", model=None, status=400))
    assert len(log.recent()) == 3  # the TUI sees the newest few
    counts, per = log.totals()
    assert counts == {("m", 200, ""): 5, ("", 400, ""): 1}  # /metrics counts them all
    m = per["m"]
    assert (m.prompt_tokens, m.cached_tokens) == (50, 0 + 1 + 2 + 3 + 4)
    assert m.ttft.n == 5 and m.ttft.counts[0] == 5  # all under 50 ms
    assert m.latency.counts == [1, 2, 5, 5, 5, 5, 5, 5, 5, 5]  # 0.1..0.5 s, cumulative
