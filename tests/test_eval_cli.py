"""`flamingo eval`'s command line: the flags of an in-process model refused with `--server`, said before anything
loads."""

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
                                   ["--vision-cache-mb", "10"]])
def test_a_flag_of_the_in_process_model_is_refused_with_server(tmp_path, capsys, no_loading, flags):
    """Each was accepted and ignored (results.json recorded `"dtype": null` after `--dtype fp32`; `--device cuda`
    ran on a machine without CUDA): the server holds the model, so the flag belongs on `flamingo serve`."""
    assert main(_eval(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert f"flamingo: error: {flags[0]} shapes an in-process model: with --server the server holds" in err
    assert "flamingo serve" in err and "Traceback" not in err


def test_every_refused_flag_is_named(tmp_path, capsys, no_loading):
    assert main(_eval(tmp_path, "--dtype", "bf16", "--device", "cpu", "--vision-cache-mb", "64")) == 2
    assert "error: --dtype, --device, --vision-cache-mb shape an in-process model" in capsys.readouterr().err


def test_a_vision_cache_of_0_is_what_server_runs_so_it_passes(tmp_path, monkeypatch, capsys):
    """No tower runs here with --server: the cache is off, as `--vision-cache-mb 0` asks (a command shared by an
    in-process run and a run through the server may keep it)."""
    import flamingo.convert.auto as auto

    def reached(*args, **kwargs):
        raise ValueError("the processor is read")

    monkeypatch.setattr(auto, "load_processor", reached)
    assert main(_eval(tmp_path, "--vision-cache-mb", "0")) == 2
    assert "flamingo: error: the processor is read" in capsys.readouterr().err
