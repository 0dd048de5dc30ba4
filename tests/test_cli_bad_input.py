"""Bad input on the command line: one `flamingo: error: ...` line naming the argument or file (exit code 2, no
traceback), said before any model loads; nonsensical values refused, never silently read as another setting."""

import http.server
import threading

import pytest

import flamingo.cli as cli
from flamingo.cli import main


@pytest.fixture
def model_dir(tmp_path):
    """A local directory standing for a saved model: the checks below refuse before anything reads it."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "flamingo_config.json").write_text("{}")
    return directory


@pytest.fixture
def no_loading(monkeypatch):
    """Any model or engine load fails the test: the refusals must come first."""
    import flamingo.convert.auto as auto
    import flamingo.serve.server as server

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    for module, name in ((auto, "load_model"), (auto, "load_processor"), (server, "build_engine")):
        monkeypatch.setattr(module, name, refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flamingo: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv,why",
    [
        (["serve", "--port", "70000"], "--port: must be a port number from 0 to 65535"),
        (["serve", "--port", "-1"], "--port: must be a port number from 0 to 65535"),
        (["serve", "--host", ""], "--host: '' names no interface (empty, it would bind every one)"),
        (["serve", "--host", " "], "--host: ' ' names no interface"),
        (["serve", "--api-key", ""], "--api-key: '' is an empty key"),
        (["serve", "--grace", "nan"], "--grace: must be a finite number >= 0"),
        (["serve", "--grace", "-5"], "--grace: must be a finite number >= 0"),
        (["serve", "--keep-alive", "0"], "--keep-alive: must be a finite number > 0"),
        (["serve", "--max-connections", "0"], "--max-connections: must be >= 1"),
        (["serve", "--allowed-host", ""], "--allowed-host: '' is not a host name"),
        (
            ["eval", "--task", "vqa", "--data", "d", "--length-penalty", "nan"],
            "--length-penalty: must be a finite number",
        ),
        (["data", "inspect", "p", "--limit", "0"], "--limit: must be >= 1"),
        (["data", "inspect", "p", "--limit", "-1"], "--limit: must be >= 1"),
        (["data", "inspect", "p", "--show", "-2"], "--show: must be >= 0"),
    ],
)
def test_nonsense_values_are_refused_by_the_parser(capsys, argv, why):
    """`--host ""` bound every interface and `--api-key ""` turned authentication off (what an unset `$HOST` /
    `$KEY` passes); `--port 70000` and `--grace nan` failed or misbehaved only after the model had loaded; `--limit
    -1` read nothing and exited 0."""
    if argv[0] in ("serve", "eval"):
        argv = [*argv, "--model", "m"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and why in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,why",
    [
        (["serve", "--batch-dir", "{model}"], "--batch-dir '{model}' is inside the model directory"),
        (["serve", "--batch-dir", "{model}/batches"], "is inside the model directory"),
        (["serve", "--batch-dir", ""], "--batch-dir: an empty path"),
        (
            ["serve", "--media-root", "{tmp}/missing"],
            "the media root '{tmp}/missing' (--media-root) is not a directory",
        ),
        (["serve", "--media-root", "{model}/flamingo_config.json"], "(--media-root) is not a directory"),
        (["serve", "--allow-private-media-hosts"], "--allow-private-media-hosts widens --allow-remote-media"),
        (
            ["batch", "--input", "{tmp}/in.jsonl", "--output", "{model}/flamingo_config.json"],
            "--output '{model}/flamingo_config.json' is inside the model directory",
        ),
        (["batch", "--input", "{tmp}/in.jsonl", "--output", "{model}/answers.jsonl"], "is inside the model directory"),
        (["batch", "--input", "{tmp}/in.jsonl", "--output", ""], "--output: an empty path"),
        (["generate", "--prompt", "x", "--sample", "--temperature", "inf"], "a finite --temperature > 0"),
        (["generate", "--prompt", "x", "--repetition-penalty", "nan"], "--repetition-penalty must be a finite number"),
        (["generate", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be a finite number"),
        (["generate", "--prompt", "x", "--repetition-penalty", "1e-40"], "--repetition-penalty must be a finite"),
        (["generate", "--prompt", "x", "--num-return-sequences", "2"], "--num-return-sequences 2 is more than "
                                                                       "--num-beams 1: without --sample"),
        (["generate", "--prompt", "x", "--num-beams", "2", "--num-return-sequences", "3"],
         "--num-return-sequences 3 is more than --num-beams 2: the sequences are the best beams (raise --num-beams)"),
        (["generate", "--prompt", "x", "--sample", "--num-beams", "2", "--num-return-sequences", "3"],
         "--num-return-sequences 3 is more than --num-beams 2: the sequences are the best beams (raise --num-beams)"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(tmp_path, model_dir, no_loading, capsys, argv, why):
    """`batch --output MODEL/flamingo_config.json` replaced the model's config with answers; `serve --batch-dir
    MODEL` kept uploads among the model's files (which `flamingo push` uploads); a missing `--media-root` refused
    every local path unsaid; `--temperature inf` reached torch.multinomial after the load, and more sequences than
    beams transformers' own refusal after it."""
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a"}\n')
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    fill = {"model": str(model_dir), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    assert main([*argv, "--model", str(model_dir)]) == 2
    assert why.format(**fill) in _error_line(capsys)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_an_empty_api_key_never_means_no_authentication():
    """The library's settings refuse it too (the app checks a key only when one is set: "" would let anyone in), and
    a key no HTTP client can send (not printable ASCII: a header is read as Latin-1, the openai client refuses to
    send one), which would refuse every request."""
    from flamingo.serve.app import ServeSettings

    for key in ("", "  ", " key", "clé-secrète", "密钥", "key\tkey"):
        with pytest.raises(ValueError, match="API key"):
            ServeSettings(api_key=key)
    assert ServeSettings(api_key="k").api_key == "k"


class _Answer(http.server.BaseHTTPRequestHandler):
    """A server's fixed answer to every GET (`status`, `body`, and the `length` it claims, if any: set per test)."""

    status, body, length = 200, b"", None

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        if self.length is not None:
            self.send_header("Content-Length", str(self.length))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "answer,why",
    [
        (None, "cannot reach the server at http://127.0.0.1:9"),
        (
            (401, b'{"error": {"message": "Incorrect or missing API key"}}'),
            "answered 401: Incorrect or missing API key",
        ),
        ((200, b"<html>not an API</html>"), "answered /v1/models with no JSON"),
        ((200, b'{"models": []}'), "answered /v1/models with no model list"),
        ((200, b'{"data": [', 1000), "no answer from the server at http://127.0.0.1:"),  # cut: IncompleteRead
    ],
)
def test_eval_with_a_server_that_cannot_answer_is_one_line_before_the_data_loads(
    tmp_path, monkeypatch, capsys, answer, why
):
    """The eval harness's server errors were tracebacks, met once the data had loaded; the server is now asked once
    the processor is read (which needs no network: `test_load_processor.py`), before the evaluation starts."""
    import flamingo.convert.auto as auto
    import flamingo.eval.runner as runner

    monkeypatch.setattr(auto, "load_processor", lambda *args, **kwargs: "processor")
    monkeypatch.setattr(runner, "evaluate", None)  # never reached
    url, httpd = "http://127.0.0.1:9", None
    if answer is not None:
        handler = type("Handler", (_Answer,), {"status": answer[0], "body": answer[1], "length": (*answer, None)[2]})
        httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        code = main(f"eval --model {tmp_path}/m --task vqa --data {tmp_path} --server {url} --no-progress".split())
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
    assert code == 2 and why in _error_line(capsys)


@pytest.mark.parametrize(
    "config,overrides,why",
    [
        (
            "model: [\n",
            [],
            "is not valid YAML: expected the node content, but found '<stream end>' at line 2, column 1",
        ),
        ("train:\n\tsteps: 3\n", [], "is not valid YAML: found character '\\t' that cannot start any token at line 2"),
        (b"\x89PNG\r\n\x1a\n", [], "is not UTF-8 text"),
        ("{dir}", [], "is a directory: name the YAML config file"),
        ("{ok}", ["train.steps=["], "override 'train.steps=[': the value '[' is not valid YAML"),
        ("{ok}", ["data.0.path=@x.jsonl"], "override 'data.0.path=@x.jsonl': the value '@x.jsonl' is not valid YAML"),
        ("{ok}", ["train.output_dir=2024"], "train.output_dir must be a string, got 2024"),
        ("{ok}", ["train.output_dir={file}"], "train.output_dir '{file}' is a file"),
    ],
)
def test_a_train_config_that_cannot_be_read_is_one_line_naming_it(
    tmp_path, monkeypatch, capsys, config, overrides, why
):
    """A YAML syntax error, a tab, a directory, a binary file or a YAML-invalid override were tracebacks; a
    train.output_dir YAML reads as a number, or naming a file, failed after the backbones had loaded."""
    import flamingo.train.trainer as trainer

    monkeypatch.setattr(trainer, "Trainer", None)  # never reached
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "ok.yaml").write_text("data: [{name: a, kind: pairs, path: a.jsonl}]\n")
    fill = {"dir": str(tmp_path), "ok": str(tmp_path / "ok.yaml"), "file": str(tmp_path / "file.txt")}
    path = tmp_path / "config.yaml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    elif config.startswith("{"):
        path = config.format(**fill)
    else:
        path.write_text(config)
    assert main(["train", str(path), *[o.format(**fill) for o in overrides]]) == 2
    line = _error_line(capsys)
    assert why.format(**fill) in line and (str(path) in line or overrides)


@pytest.mark.parametrize(
    "argv,why",
    [
        (["inspect", "{tmp}/p.jsonl", "--out", "{file}"], "--out '{file}' is a file"),
        (["inspect", "{tmp}/p.jsonl", "--out", "{file}/report"], "--out '{file}/report' cannot be a directory"),
        (
            ["inspect", "{tmp}/p.jsonl", "--option", "max_tokens=["],
            "--option 'max_tokens=[': the value is not valid YAML",
        ),
        (["inspect", "{tmp}/p.jsonl", "--tokenizer-from", "{tmp}/missing"], "--tokenizer-from directory not found"),
        (["inspect", "{tmp}/p.jsonl", "--tokenizer-from", "{file}"], "--tokenizer-from '{file}' is a file"),
        (
            ["pack", "--from", "{tmp}/p.jsonl", "--kind", "pairs", "--out", "{file}"],
            "the shards' directory cannot be made, '{file}' is a file",
        ),
        (
            ["pack", "--from", "{tmp}/p.jsonl", "--kind", "pairs", "--out", "{tmp}/s/g-%d-%d.tar"],
            "a pattern needs exactly one %d field",
        ),
        (
            ["pack", "--from", "{tmp}/p.jsonl", "--kind", "pairs", "--out", "{tmp}/s/g-%%.tar"],
            "a pattern needs exactly one %d field",
        ),
        (["pack", "--images", "{tmp}/missing", "--out", "{tmp}/s"], "--images '{tmp}/missing' is not a directory"),
        (["pack", "--images", "{file}", "--out", "{tmp}/s"], "is not a directory"),
        (
            ["pack", "--from", "{tmp}/p.jsonl", "--kind", "pairs", "--image-dir", "{tmp}", "--out", "{tmp}/s"],
            "--image-dir is where an interleaved table's image_name files are",
        ),
        (
            [
                "pack",
                "--from",
                "{tmp}/p.jsonl",
                "--kind",
                "interleaved",
                "--image-dir",
                "{tmp}/missing",
                "--out",
                "{tmp}/s",
            ],
            "--image-dir '{tmp}/missing' is not a directory",
        ),
    ],
)
def test_data_commands_refuse_bad_paths_and_patterns_before_reading_the_data(tmp_path, monkeypatch, capsys, argv, why):
    """`inspect --out FILE` failed after the whole pass (its report lost); a two-field shard pattern, a missing
    `--images` folder or a `--tokenizer-from` file were tracebacks or unnamed."""
    import flamingo.data.inspect as inspect

    monkeypatch.setattr(inspect, "inspect_dataset", None)  # never reached
    (tmp_path / "file.txt").write_text("x")
    fill = {"tmp": str(tmp_path), "file": str(tmp_path / "file.txt")}
    assert main(["data", *[a.format(**fill) for a in argv]]) == 2
    assert why.format(**fill) in _error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_a_missing_or_file_tokenizer_is_named_not_transformers_repo_id_advice(tmp_path):
    from flamingo.processing import load_tokenizer

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: .*missing"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="tokenizer '.*file.txt' is a file, not a directory"):
        load_tokenizer(str(tmp_path / "file.txt"))


@pytest.mark.parametrize(
    "option,value",
    [
        ("shuffle_buffer", -1),
        ("min_samples_for_bad_check", -3),
        ("remote_cache_gb", float("nan")),
        ("remote_cache_gb", float("inf")),
    ],
)
def test_stream_options_read_as_another_setting_are_refused(option, value):
    """shuffle_buffer -1 turned the buffer off unsaid; NaN passed remote_cache_gb's `<= 0` check."""
    from flamingo.data.spec import DatasetSpec

    with pytest.raises(ValueError, match=f"dataset 'd': option {option} must be"):
        DatasetSpec.create("d", "pairs", "unread.jsonl", 1, {option: value}, None)


def test_main_says_an_os_error_in_one_line_and_keeps_a_bugs_traceback(monkeypatch, capsys):
    def fails(error):
        def command(args):
            raise error

        return command

    monkeypatch.setattr(cli, "_cmd_tiny", fails(IsADirectoryError(21, "Is a directory", "x.png")))
    assert main(["tiny"]) == 2
    assert "Is a directory: 'x.png'" in _error_line(capsys)
    monkeypatch.setattr(cli, "_cmd_tiny", fails(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["tiny"])


def test_the_documented_bounds_are_in_the_help(capsys):
    from flamingo.model.generation import MIN_REPETITION_PENALTY

    for command, words in (
        (["generate"], [f"a finite number >= {MIN_REPETITION_PENALTY:g} (1: none"]),
        (["serve"], ["0 to 65535", "never empty", "an empty key is refused"]),
        (["data", "inspect"], [">= 1; default: all", ">= 0; 0: none drawn"]),
    ):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), (command, text)


def test_a_bad_train_config_is_refused_before_torch_or_the_trainer_is_imported(tmp_path):
    """As a user's fresh process: the config is read first, so its error comes in a fraction of a second, not after
    the trainer's imports (torch, transformers: seconds)."""
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("data: [{name: a, kind: pairs, path: x}]\ntrain: {stepz: 1}\n")
    code = ("import sys; from flamingo.cli import main; code = main(['train', 'bad.yaml']); "
            "print(code, 'torch' in sys.modules, 'flamingo.train.trainer' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.stdout.split() == ["2", "False", "False"], run.stderr[-2000:]
    assert "unknown keys in train: ['stepz']" in run.stderr
