"""bench/serve.py's measurement: k-shot requests with one image per shot plus the query, and the client that times
each streamed token (one timestamp per token, so its gaps are the inter-token latencies)."""

import asyncio

from bench.generate import QUERY, SHOT
from bench.serve import _pct, prefill_ceiling, requests_for, run_clients
from bench.serve_steps import _spread
from flamingo.serve.app import ServeSettings

from serve_helpers import engine_for, running_server, save_tiny_model


def test_requests_are_k_shot_prompts_with_their_own_images():
    requests = requests_for(6, [0, 2], image_size=32, max_tokens=5, seed=1)
    for r in requests:
        k = r["prompt"].count(SHOT)
        assert r["prompt"] == SHOT * k + QUERY and k in (0, 2)
        assert len(r["media"]) == k + 1 and len(set(r["media"])) == k + 1
        assert r["temperature"] == 0 and r["stream"] and r["max_tokens"] == 5
    assert {r["prompt"].count(SHOT) for r in requests} == {0, 2}
    assert _pct([3.0, 1.0, 2.0], 50) == 2.0 and _pct([1.0, 2.0, 3.0], 99) == 3.0


def test_shared_demos_share_all_but_the_query_image():
    requests = requests_for(6, [2], image_size=32, max_tokens=5, seed=1, shared_demos=True)
    assert len({tuple(r["media"][:2]) for r in requests}) == 1
    assert len({r["media"][2] for r in requests}) == 6


def test_clients_time_every_token_and_agree_with_one_at_a_time(tmp_path, one_thread):
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=4, prefill_chunk=8)
    requests = requests_for(4, [0, 1, 2], image_size=32, max_tokens=6)
    with running_server(engine, ServeSettings(max_images=8)) as url:
        _, alone = asyncio.run(run_clients(url, requests, 1))
        _, together = asyncio.run(run_clients(url, requests, 4))
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert all(r["prompt_tokens"] > r["cached_tokens"] >= 0 for r in together)
    for r in together:
        assert len(r["gaps"]) == r["tokens"] - 1  # one event per token
        assert r["ttft"] > 0 and all(g >= 0 for g in r["gaps"])


def test_prefill_ceiling_is_whole_time_over_prefill_time():
    results = [{"ttft": 0.2, "gaps": [0.1, 0.1, 0.2]}, {"ttft": 0.6, "gaps": [0.2]}]
    assert abs(prefill_ceiling(results) - (0.4 + 0.3) / 0.4) < 1e-12  # means: prefill 0.4 s, decode 0.3 s


def test_mixed_step_batches_hold_the_shortest_and_longest_prompts():
    assert _spread([8, 0, 1, 2, 4], 4) == [0, 1, 2, 8]
    assert _spread([0, 8], 1) == [0] and sorted(set(_spread([0, 1, 2, 4, 8], 16))) == [0, 1, 2, 4, 8]


def test_sampling_bench_runs_and_its_answer_follows_its_schema(capsys, one_thread):
    """bench/serve_sampling.py on the tiny shape: its table and JSON lines (it raises if the answer it walks the
    grammar with does not follow the schema)."""
    import json

    from bench.serve_sampling import main

    main(["--shape", "tiny", "--rows", "1", "2", "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"bench"')]
    steps = [line for line in lines if line["bench"] == "serve_sampling"]
    assert [line["rows"] for line in steps] == [1, 2]
    assert all(line["json_schema_ms"] > 0 and line["decode_step_ms"] > 0 for line in steps)


def test_prefill_bench_times_prompts_alone_and_together(capsys, one_thread):
    import json

    from bench.serve_prefill import main

    main(["--shape", "tiny", "--kinds", "chat", "1-shot", "--prompts", "2", "--repeats", "1"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"bench"')]
    rows, (line,) = lines[:-1], lines[-1:]
    # each row printed as it ends (a run cut at its limit keeps them), then the summary
    assert [r["bench"] for r in rows] == ["serve_prefill.row"] * 2 and line["bench"] == "serve_prefill"
    assert [{k: v for k, v in r.items() if k in line["results"][0]} for r in rows] == line["results"]
    assert [(r["kind"], r["prompts"]) for r in line["results"]] == [("chat", 2), ("1-shot", 2)]
    assert all(r["alone_ms"] > 0 and r["together_ms"] > 0 and r["padded"] == 1.0 for r in line["results"])
