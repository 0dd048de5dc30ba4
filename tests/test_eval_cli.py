"""`flamingo eval`'s command line: the flags of an in-process model refused with `--server`, said before anything
loads; the vision cache's two spellings, and its abbreviations."""

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
    assert f"flamingo: error: {flags[0]} shapes an in-process model: with --server the server holds" in err
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


@pytest.mark.parametrize("typed", ["--vision-cache-mb", "--vision-cache-mb=64", "--vision-cache-mib"])
def test_the_refused_cache_flag_is_named_as_typed(tmp_path, capsys, no_loading, typed):
    """`--vision-cache-mb 64` was refused naming `--vision-cache-mib`, a flag the user's command did not hold."""
    flags = [typed] if "=" in typed else [typed, "64"]
    assert main(_eval(tmp_path, "--dtype", "bf16", *flags)) == 2
    assert f"flamingo: error: --dtype, {typed.split('=')[0]} shape an in-process model" in capsys.readouterr().err


@pytest.mark.parametrize("abbreviation", ["--vision-cache", "--vision-cache-m", "--vision"])
def test_an_abbreviation_of_the_cache_flag_is_the_shown_flag_not_ambiguous(tmp_path, monkeypatch, capsys,
                                                                         abbreviation):
    """`--vision-cache 64` matches `--vision-cache-mib` and the hidden `--vision-cache-mb`, one setting: it was
    refused as "ambiguous", naming a spelling --help does not show. It is the shown flag."""
    import flamingo.convert.auto as auto
    import flamingo.eval.runner as runner

    def evaluate(*args, **kwargs):
        raise ValueError(f"the cache is {kwargs['vision_cache_mb']} MiB")

    monkeypatch.setattr(auto, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(runner, "evaluate", evaluate)
    command = ["eval", "--model", str(tmp_path / "m"), "--task", "vqa", "--data", str(tmp_path)]
    assert main([*command, abbreviation, "64"]) == 2
    assert "flamingo: error: the cache is 64.0 MiB" in capsys.readouterr().err
    assert main([*command, "--server", "http://127.0.0.1:9", abbreviation, "64"]) == 2
    assert "flamingo: error: --vision-cache-mib shapes an in-process model" in capsys.readouterr().err


def test_an_abbreviation_of_two_settings_is_still_ambiguous(tmp_path, capsys):
    """Only a hidden spelling of the same setting stands aside: `--de` (--demos, --device, ...) is refused."""
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", "m", "--task", "vqa", "--data", str(tmp_path), "--de", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "ambiguous option: --de could match" in err
    assert "--demos" in err and "--device" in err
