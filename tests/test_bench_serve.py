"""bench-serve: one server per budget driven by N concurrent streaming clients; the lines, the ratios, the plot."""

from __future__ import annotations

import json

import pytest

from flexio.cli import main
from flexio_bench import serve as bench_serve


def test_medians_and_the_ratio_to_one_stream():
    rep = lambda agg2: [  # noqa: E731
        {"concurrency": 1, "aggregate_decode_tok_s": 10.0, "steady_decode_tok_s": 11.0, "per_request_tok_s": 10.0,
         "ttft_p50_s": 0.1, "ttft_p95_s": 0.1},
        {"concurrency": 2, "aggregate_decode_tok_s": agg2, "steady_decode_tok_s": agg2 + 3.0, "per_request_tok_s": agg2 / 2,
         "ttft_p50_s": 0.2, "ttft_p95_s": 0.3},
    ]
    lines = bench_serve._median_lines([rep(18.0), rep(19.0), rep(30.0)])
    assert [x["aggregate_decode_tok_s"] for x in lines] == [10.0, 19.0]
    assert [x["ratio_to_1"] for x in lines] == [1.0, 1.9]
    assert [x["steady_ratio_to_1"] for x in lines] == [1.0, 2.0]
    assert lines[1]["runs_aggregate_decode_tok_s"] == [18.0, 19.0, 30.0]


def test_steady_rate_counts_only_the_window_where_all_decode():
    # request a: first token at 1, then one every second until 10; b: prompt passes until 5, then until 8
    a = {"first": 1.0, "end": 10.0, "arrivals": [float(t) for t in range(1, 11)]}
    b = {"first": 5.0, "end": 8.5, "arrivals": [5.0, 6.0, 7.0, 8.0]}
    # window (5, 8]: a's 6, 7, 8 and b's 6, 7, 8
    assert bench_serve.steady_rate([a, b]) == pytest.approx(6 / 3)
    assert bench_serve.steady_rate([a]) == pytest.approx(9 / 9)
    assert bench_serve.steady_rate([{"first": 2.0, "end": 2.0, "arrivals": [2.0]}]) == 0.0


@pytest.mark.slow  # a server child process per budget, each loading the kernels
def test_bench_serve_end_to_end(smollm2_path, tmp_path, capsys):
    png = tmp_path / "serve.png"
    assert main(["bench-serve", smollm2_path, "--budget", "none,40%", "--concurrency", "1,2", "-n", "6",
                 "--threads", "2", "--out", str(png)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[0]["header"]["parallel"] == 2
    points = [x for x in lines if "concurrency" in x]
    assert [(x["budget"], x["concurrency"]) for x in points] == [("none", 1), ("none", 2), ("40%", 1), ("40%", 2)]
    for x in points:
        assert x["tokens"] == 6 * x["concurrency"] and x["aggregate_decode_tok_s"] > 0 and x["ttft_p95_s"] >= x["ttft_p50_s"]
        assert x["steady_decode_tok_s"] > 0
        assert x["ratio_to_1"] == pytest.approx(x["aggregate_decode_tok_s"] / points[0 if x["budget"] == "none" else 2]
                                                ["aggregate_decode_tok_s"], abs=1e-3)
    two = [x for x in points if x["concurrency"] == 2]
    assert all(x["batch_size_mean"] > 1.2 for x in two)  # the two requests shared passes
    assert points[2]["streamed_bytes_per_pass"] > 0 and points[0]["streamed_bytes_per_pass"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
