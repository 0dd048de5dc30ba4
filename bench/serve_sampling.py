"""What the server's token choice costs per decode step, beside the step itself: greedy; sampled (temperature 1, the
API's default; temperature 0.8 with top_p 0.9: the random model's flat distribution makes top-p sort each row); with
logprobs (the chosen token's and 5 alternatives); with frequency / presence penalties (over 24 generated tokens, as the
counts per id the engine keeps) and a logit bias; with a JSON schema (`response_format`, each row its own grammar
matcher, measured at every position of a valid answer). In-process,
bench/serve.py's model (the `cpu` shape: a 32000-token vocabulary), a `DecodeBatch` of 1 and 16 rows of a 0-shot prompt.

    python -m bench.serve_sampling --shape cpu --threads 1

Also: building the tokenizer's grammar tables (once per server, at the first structured request) and compiling the
schema (once per request). Times are the fastest of `--repeats` calls after a warm-up (the least disturbed on shared
cores); the JSON-schema column is the mean over the answer's positions of each position's fastest call.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional

import torch

from bench.common import SHAPES, machine, print_json, print_table
from bench.serve import build_model
from bench.serve_steps import _seconds, k_shot
from flamingo.model.batching import DecodeBatch
from flamingo.model.generation import generation_config_for
from flamingo.model.logprobs import token_logprobs
from flamingo.model.prefill import Prefill
from flamingo.serve.sampling import SamplingParams, pick_tokens, row_generator
from flamingo.serve.structured import Grammars

SCHEMA = {"type": "object", "properties": {
    "animal": {"type": "string", "enum": ["cat", "dog", "bird"]}, "count": {"type": "integer", "minimum": 0},
    "caption": {"type": "string", "maxLength": 40}, "outdoors": {"type": "boolean"}},
    "required": ["animal", "count", "caption", "outdoors"], "additionalProperties": False}
ANSWER = '{"animal":"dog","count":2,"caption":"two dogs play with a ball on the grass","outdoors":true}'


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench.serve_sampling on {machine()}, shape={args.shape}, fp32, threads={torch.get_num_threads()}")
    model, processor, size = build_model(args.shape, 1)
    tokenizer = processor.tokenizer
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    config = generation_config_for(model)
    suppress = list(config.suppress_tokens or [])
    grammars = Grammars(tokenizer, vocab, sorted(config.eos_token_id))
    fmt = {"type": "json_schema", "json_schema": {"name": "photo", "schema": SCHEMA}}
    start = time.perf_counter()
    grammars.compile(fmt)
    tables_ms = 1e3 * (time.perf_counter() - start)  # the tokenizer's tables, then one schema
    compile_ms = 1e3 * _seconds(lambda: grammars.compile(fmt), args.repeats)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)

    ids, media = k_shot(processor, 0, size)
    row = Prefill(model, ids, media["images"], media.get("num_media"), media.get("num_frames")).step(2**62)
    table = []
    for rows in args.rows:
        batch = DecodeBatch(model, max(args.rows))
        batch.add(row, copies=rows)
        tokens = torch.full((rows,), 5, dtype=torch.long)
        step_ms = 1e3 * _seconds(lambda: batch.step(tokens), args.repeats)
        logits = batch.step(tokens)  # (rows, V)
        greedy = [SamplingParams(16, temperature=0.0)] * rows
        none = [None] * rows
        history = [torch.bincount(torch.tensor(answer[:24]), minlength=logits.shape[-1]).float()] * rows
        sampled = [SamplingParams(16, seed=i) for i in range(rows)]
        top_p = [SamplingParams(16, temperature=0.8, top_p=0.9, seed=i) for i in range(rows)]
        generators = [row_generator(p, 0, logits.device) for p in sampled]
        penalised = [SamplingParams(16, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.5,
                                    logit_bias=tuple((i, 5.0) for i in range(100, 150)))] * rows
        picked = pick_tokens(logits, greedy, none, suppress)
        costs = {
            "greedy_ms": _seconds(lambda: pick_tokens(logits, greedy, none, suppress), args.repeats),
            "sample_ms": _seconds(lambda: pick_tokens(logits, sampled, generators, suppress), args.repeats),
            "top_p_ms": _seconds(lambda: pick_tokens(logits, top_p, generators, suppress), args.repeats),
            "logprobs_ms": _seconds(lambda: (pick_tokens(logits, greedy, none, suppress),
                                             token_logprobs(logits, picked, 5)), args.repeats),
            "penalties_ms": _seconds(lambda: pick_tokens(logits, penalised, none, suppress, generated=history),
                                     args.repeats),
        }
        per_position = []
        constraints = [grammars.compile(fmt).constraint() for _ in range(rows)]
        for i, token in enumerate(answer):
            per_position.append(_seconds(lambda: pick_tokens(logits, greedy, none, suppress,
                                                             constraints=constraints), args.repeats))
            complete = [c.accept(token) for c in constraints]
            if any(complete) != (i == len(answer) - 1) or any(c.matcher.is_error() for c in constraints):
                raise RuntimeError(f"ANSWER does not follow SCHEMA at its token {i}")
        costs["json_schema_ms"] = sum(per_position) / len(per_position)
        result = {"rows": rows, "decode_step_ms": step_ms, **{k: 1e3 * v for k, v in costs.items()}}
        for key in ("sample_ms", "top_p_ms", "logprobs_ms", "penalties_ms", "json_schema_ms"):
            result[key.replace("_ms", "_vs_step")] = (result[key] - result["greedy_ms"]) / step_ms
        table.append(result)
        print_json("serve_sampling", {"shape": args.shape, "vocab": vocab, **result})
    print_table(table, ["rows", "decode_step_ms", "greedy_ms", "sample_ms", "top_p_ms", "logprobs_ms", "penalties_ms",
                        "json_schema_ms", "sample_vs_step", "top_p_vs_step", "logprobs_vs_step", "penalties_vs_step",
                        "json_schema_vs_step"])
    once = {"tokenizer_tables_and_first_schema_ms": tables_ms, "schema_compile_ms": compile_ms,
            "answer_tokens": len(answer)}
    print(json.dumps(once))
    print_json("serve_sampling.compile", {"shape": args.shape, "vocab": vocab, **once})


if __name__ == "__main__":
    main()
