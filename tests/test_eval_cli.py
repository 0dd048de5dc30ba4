"""`flamingo eval`'s command line: the flags of an in-process model refused with `--server`, said before anything
loads; the vision cache's two spellings."""

import pytest

from flamingo.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Any processor or model load, or a request to the server, fails the test: the refusal must come first."""
    import flamingo.convert.auto as auto
    import flamingo.eval.remote as remote

    def refuse(*args, **kwargs):
        raise AssertionError("the processor, model or server was reached before the flags were refused")

    for module, name in ((auto, "load_model"), (auto, "load_processor"), (remote, "RemoteModel")):
        monkeypatch.setattr(module, name, refuse)


def _eval(tmp_path, *flags: str) -> list[str]:
    return ["eval", "--model", str(tmp_path / "m"), "--task", "vqa", "--data", str(tmp_path), "--server",
            "http://127.0.0.1:9", *flags]


@pytest.mark.parametrize("flags", [["--dtype", "fp32"], ["--quantize-frozen", "int8"], ["--device", "cuda"],
                                   ["--vision-cache-mib", "10"], ["--vision-cache-mb", "10"]])
def test_a_flag_of_the_in_process_model_is_refused_with_server(tmp_path, capsys, no_loading, flags):
    """Each was accepted and ignored (results.json recorded `"dtype": null` after `--dtype fp32`; `--device cuda`
    ran on a machine without CUDA): the server holds the model, so the flag belongs on `flamingo serve`."""
    assert main(_eval(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    named = flags[0].replace("-mb", "-mib")  # the cache's other spelling is named as serve spells it
    assert f"flamingo: error: {named} shapes an in-process model: with --server the server holds" in err
    assert "flamingo serve" in err and "Traceback" not in err


def test_every_refused_flag_is_named(tmp_path, capsys, no_loading):
    assert main(_eval(tmp_path, "--dtype", "bf16", "--device", "cpu", "--vision-cache-mib", "64")) == 2
    assert "error: --dtype, --device, --vision-cache-mib shape an in-process model" in capsys.readouterr().err


def test_a_vision_cache_of_0_is_what_server_runs_so_it_passes(tmp_path, monkeypatch, capsys):
    """No tower runs here with --server: the cache is off, as `--vision-cache-mb 0` asks (a command shared by an
    in-process run and a run through the server may keep it)."""
    import flamingo.convert.auto as auto

    def reached(*args, **kwargs):
        raise ValueError("the processor is read")

    monkeypatch.setattr(auto, "load_processor", reached)
    assert main(_eval(tmp_path, "--vision-cache-mib", "0")) == 2
    assert "flamingo: error: the processor is read" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["--vision-cache-mib", "--vision-cache-mb"])
def test_the_vision_cache_is_spelled_as_serve_spells_it_and_the_other_spelling_still_works(
    tmp_path, monkeypatch, capsys, spelling
):
    """`flamingo serve --vision-cache-mib` copied to eval was `unrecognized arguments` (eval had `-mb` only, MiB
    too): both name the cache evaluate() gets; `--help` shows serve's spelling."""
    import flamingo.convert.auto as auto
    import flamingo.eval.runner as runner

    def evaluate(*args, **kwargs):
        raise ValueError(f"the cache is {kwargs['vision_cache_mb']} MiB")

    monkeypatch.setattr(auto, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(runner, "evaluate", evaluate)
    command = ["eval", "--model", str(tmp_path / "m"), "--task", "vqa", "--data", str(tmp_path)]
    assert main([*command, spelling, "64"]) == 2
    assert "flamingo: error: the cache is 64.0 MiB" in capsys.readouterr().err
    assert main(command) == 2
    assert "flamingo: error: the cache is None MiB" in capsys.readouterr().err  # the default: evaluate's choice
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--vision-cache-mib" in text and "--vision-cache-mb " not in text
