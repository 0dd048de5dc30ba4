"""`flamingo serve`: an OpenAI-compatible HTTP server with continuous batching and a web page (docs/serve.md).

- `protocol`: request schemas and OpenAI-style errors;
- `template`: chat messages -> one prompt in the served model's format (Flamingo's few-shot, IDEFICS's dialogue);
- `media`: media URLs -> frames under the operator's policy;
- `sampling`: per-row greedy / temperature / top-p choice;
- `engine`: the bounded queue and the continuous-batching loop (over `flamingo.model.batching`);
- `responses`: engine events -> chat / completion bodies and stream chunks; `openai_responses`: -> the Responses
  API's object and typed events;
- `metrics`: Prometheus text;
- `app`: the FastAPI routes; `middleware`: counting requests, relative redirects, the browser checks (Host,
  cross-site posts); `server`: loading a model and
  running uvicorn;
- `batch_lines`: a Batch API file's lines -> requests through the app -> output entries, shared by `batch` (the
  offline `flamingo batch`) and the Files and Batch APIs: `batches` (routes), `batch_store` (on disk),
  `batch_runner` (the background queue).
"""
