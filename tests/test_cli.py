"""The `flamingo` command: the README's smoke run, generation from a saved model, clear errors, the demo's
hand-over."""

import json
import subprocess
import sys

import pytest
import torch

from flamingo.cli import main
from flamingo.tiny import (
    random_image,
    tiny_flamingo,
)


def test_tiny_command_reports_per_image_masking_in_its_json_line(capsys):
    assert main(["tiny", "--lm", "gpt2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens_before_2nd_image_unchanged_when_it_changes"] is True
    assert summary["tokens_after_2nd_image_changed"] is True
    assert summary["lm"] == "gpt2" and summary["visual_tokens"][:2] == [1, 2]


@pytest.fixture
def saved_model(tmp_path):
    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    random_image(0).save(tmp_path / "a.png")
    return tmp_path


def test_generate_command_beam_search_prints_the_api_beams(saved_model, capsys):
    from flamingo import load_pretrained

    d = saved_model
    model, processor = load_pretrained(str(d / "model"))
    prompt = "<image>Question: what? Answer:"
    batch = processor(prompt, images=[str(d / "a.png")])
    args = ["generate", "--model", str(d / "model"), "--prompt", prompt, "--image", str(d / "a.png"),
            "--max-new-tokens", "4", "--num-beams", "3", "--num-return-sequences", "2"]
    assert main(args) == 0
    beams = model.generate(**batch, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    t = batch["input_ids"].shape[1]
    assert capsys.readouterr().out == "".join(processor.decode(row) + "\n" for row in beams[:, t:])


def test_generate_command_prints_what_the_api_generates(saved_model, capsys):
    """The streamed greedy answer is the API's; `--sample --seed S --num-return-sequences 3` prints the three
    sequences the API samples under that seed, one per line, the same on a rerun."""
    from flamingo import load_pretrained

    d = saved_model
    model, processor = load_pretrained(str(d / "model"))
    prompt = "<image>Question: what? Answer:"
    batch = processor(prompt, images=[str(d / "a.png")])
    t = batch["input_ids"].shape[1]
    args = ["generate", "--model", str(d / "model"), "--prompt", prompt, "--image", str(d / "a.png"),
            "--max-new-tokens", "4"]
    assert main(args) == 0
    greedy = model.generate(**batch, max_new_tokens=4)
    assert capsys.readouterr().out.strip() == processor.decode(greedy[0, t:]).strip()
    sampled = args + ["--sample", "--top-k", "50", "--seed", "3", "--num-return-sequences", "3"]
    assert main(sampled) == 0
    printed = capsys.readouterr().out
    torch.manual_seed(3)
    expected = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=50, num_return_sequences=3)
    assert expected.shape[0] == 3 and len({tuple(row.tolist()) for row in expected}) > 1
    assert printed == "".join(processor.decode(row) + "\n" for row in expected[:, t:])  # random bytes: no split
    assert main(sampled) == 0 and capsys.readouterr().out == printed


def test_generate_top_p_0_samples_the_likeliest_token_as_the_server_does(saved_model, capsys):
    """`--sample --top-p 0` was refused while the server takes `top_p: 0` (docs/serve.md): transformers' nucleus
    then keeps its minimum, one token, so the answer is the greedy one under any seed."""
    d = saved_model
    args = ["generate", "--model", str(d / "model"), "--prompt", "<image>Question: what? Answer:", "--image",
            str(d / "a.png"), "--max-new-tokens", "6"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    for seed in ("1", "2"):
        assert main([*args, "--sample", "--temperature", "5", "--top-p", "0", "--seed", seed]) == 0
        assert capsys.readouterr().out == greedy
    assert main([*args, "--sample", "--temperature", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out != greedy  # the temperature alone samples other tokens


def test_generate_command_prints_to_a_stdout_that_cannot_encode_its_text(saved_model, monkeypatch):
    """A Windows redirect's cp1252 or an ASCII stdout (LANG=C): characters it lacks are written as "?", not every
    generation lost to an error that blamed the input."""
    import io

    from flamingo import load_pretrained

    d = saved_model
    model, processor = load_pretrained(str(d / "model"))
    prompt = "<image>Question: what? Answer:"
    batch = processor(prompt, images=[str(d / "a.png")])
    torch.manual_seed(3)
    expected = model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=50, num_return_sequences=3)
    text = "".join(processor.decode(row) + "\n" for row in expected[:, batch["input_ids"].shape[1]:])
    assert not text.isascii()
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii", newline=""))
    assert main(["generate", "--model", str(d / "model"), "--prompt", prompt, "--image", str(d / "a.png"),
                 "--max-new-tokens", "8", "--sample", "--top-k", "50", "--seed", "3",
                 "--num-return-sequences", "3"]) == 0
    sys.stdout.flush()
    assert raw.getvalue() == text.encode("ascii", "replace")


def test_generate_command_reports_bad_prompts_and_media_with_exit_code_2(saved_model, capsys):
    d = saved_model
    base = ["generate", "--model", str(d / "model"), "--max-new-tokens", "2"]
    assert main(base + ["--prompt", "<image><image>x", "--image", str(d / "a.png")]) == 2
    assert "placeholder" in capsys.readouterr().err
    assert main(base + ["--prompt", "<image>x", "--image", str(d / "missing.png")]) == 2
    assert "not found" in capsys.readouterr().err
    (d / "bad.png").write_bytes(b"garbage")
    assert main(base + ["--prompt", "<image>x", "--image", str(d / "bad.png")]) == 2
    assert "cannot decode" in capsys.readouterr().err
    for extra, message in ((["--prompt", ""], "the prompt is empty"),  # an IndexError inside generate before
                           (["--prompt", "x", "--num-beams", "0"], "--num-beams must be >= 1"),  # ZeroDivisionError
                           (["--prompt", "x", "--num-return-sequences", "0"], "--num-return-sequences must be"),
                           (["--prompt", "x", "--temperature", "0.5"], "add --sample"),  # silently greedy
                           (["--prompt", "x", "--sample", "--top-p", "2"], "--top-p in [0, 1]"),
                           (["--prompt", "x", "--sample", "--top-p", "-0.1"], "--top-p in [0, 1]")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_demo_subcommand_hands_its_arguments_to_the_demo_package(monkeypatch):
    """`flamingo demo ARGS` is `flamingo_demo.cli.main(ARGS)`, imported only then; its options are the demo's."""
    import flamingo_demo.cli

    seen = []
    monkeypatch.setattr(flamingo_demo.cli, "main", lambda argv: seen.append(list(argv)) or 7)
    assert main(["demo", "--out", "x", "--seed", "3", "--help"]) == 7
    assert seen == [["--out", "x", "--seed", "3", "--help"]]


def test_the_demo_names_itself_as_invoked(monkeypatch, capsys):
    """`flamingo-demo --help` (the console script) said `usage: flamingo demo`, a command of another script."""
    import flamingo_demo.cli

    monkeypatch.setattr(sys, "argv", ["/env/bin/flamingo-demo", "--help"])
    for argv, usage in ((None, "usage: flamingo-demo [-h]"), (["--help"], "usage: flamingo demo [-h]")):
        with pytest.raises(SystemExit):
            flamingo_demo.cli.main(argv)
        assert capsys.readouterr().out.startswith(usage)


def test_library_import_does_not_load_the_demo():
    code = "import flamingo, flamingo.cli, flamingo.train.trainer, flamingo.eval.runner, sys; " \
           "print(sorted(m for m in sys.modules if m.startswith('flamingo_demo')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generate_command_reads_declared_images_and_references(tmp_path, capsys):
    from flamingo import load_pretrained

    model, processor = tiny_flamingo(num_image_references=4)
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    for i in (0, 1):
        random_image(i).save(tmp_path / f"{i}.png")
    images = [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    prompt = "Image 0 is <image0>. Image 1 is <image1>. Question: what is in <image0>? Answer:"
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt", prompt, "--image", images[0], "--image",
            images[1], "--max-new-tokens", "4", "--image-references"]
    assert main(args) == 0
    loaded, loaded_processor = load_pretrained(str(tmp_path / "model"))
    batch = loaded_processor(prompt, images=images, image_references=True)
    expected = loaded.generate(**batch, max_new_tokens=4)[0, batch["input_ids"].shape[1]:]
    assert capsys.readouterr().out.strip() == loaded_processor.decode(expected).strip()
    # without the flag (`flamingo train` saves the processor's image_references false) a prompt that places no <image>
    # and declares its media is read as declared: the only reading they fit
    assert main(args[:-1]) == 0
    assert capsys.readouterr().out.strip() == loaded_processor.decode(expected).strip()
    assert main(args[:-1] + ["--no-image-references"]) == 2  # read as written: <image0> is no placeholder
    assert "placeholder" in capsys.readouterr().err


def test_a_streamed_answer_keeps_the_reference_tokens_it_generates(tmp_path, capsys, monkeypatch):
    """`<imageK>` is an added special token a generated answer names an image with: the greedy stream (printed
    token by token, a line break resetting its decoding) prints it as the beams' and sequences' final decode does,
    `processor.decode`, which keeps references and drops control tokens; so does the `--chat` stream."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from flamingo import load_pretrained
    from flamingo.model.flamingo import Flamingo

    model, processor = tiny_flamingo(num_image_references=4)
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    random_image(0).save(tmp_path / "0.png")
    first, _ = model.references
    enc = lambda text: processor.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    answer = [first, *enc(" is red\n"), first + 2, *enc(" and"), first + 1, *enc("\n"), first + 3]

    class Forced(LogitsProcessor):  # the model writes `answer` (random weights would rarely pick a reference)
        def __init__(self, prompt_len: int) -> None:
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - self.prompt_len
            if step < len(answer):
                scores = torch.full_like(scores, -float("inf"))
                scores[:, answer[step]] = 0.0
            return scores

    generate = Flamingo.generate
    generated = []

    def forced(self, input_ids, *args, **kwargs):
        out = generate(self, input_ids, *args, logits_processor=LogitsProcessorList([Forced(input_ids.shape[1])]),
                       **kwargs)
        generated.append(out[0, input_ids.shape[1]:])
        return out

    monkeypatch.setattr(Flamingo, "generate", forced)
    _, loaded_processor = load_pretrained(str(tmp_path / "model"))
    base = ["generate", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "0.png"),
            "--max-new-tokens", str(len(answer))]
    assert main(base + ["--prompt", "<image>Question: what? Answer:"]) == 0
    assert generated[-1].tolist() == answer
    text = loaded_processor.decode(generated[-1])
    assert text == "<image0> is red\n<image2> and<image1>\n<image3>"
    assert capsys.readouterr().out == text + "\n"
    assert main(base + ["--chat", "--prompt", "What is it?"]) == 0
    assert generated[-1].tolist() == answer
    assert capsys.readouterr().out == text + "\n"


def test_generate_command_on_a_processor_that_reads_declared_images(tmp_path, capsys):
    """A model saved with `image_references` on: `--chat` writes its media as the format's <image>s and answers as
    the API does for that prompt; a plain <image> prompt runs with `--no-image-references` and, without it, is refused
    with a message that names the flag."""
    from flamingo import load_pretrained
    from flamingo.chat import Turn, chat_format_for

    model, processor = tiny_flamingo(num_image_references=4)
    processor.image_references = True
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    random_image(0).save(tmp_path / "0.png")
    image = str(tmp_path / "0.png")
    loaded, loaded_processor = load_pretrained(str(tmp_path / "model"))
    assert loaded_processor.image_references

    def expected(prompt: str) -> str:
        batch = loaded_processor(prompt, images=[image], image_references=False)
        return loaded_processor.decode(loaded.generate(**batch, max_new_tokens=4)[0, batch["input_ids"].shape[1]:])

    base = ["generate", "--model", str(tmp_path / "model"), "--image", image, "--max-new-tokens", "4"]
    assert main(base + ["--chat", "--prompt", "What is it?"]) == 0
    fmt = chat_format_for(loaded_processor, loaded.lm.get_output_embeddings().weight.shape[0])
    chat_prompt = fmt.render([Turn("user", ("<image>", "What is it?"))])
    assert capsys.readouterr().out.strip() == expected(chat_prompt).strip()
    assert main(base + ["--no-image-references", "--prompt", "<image>What is it?"]) == 0
    assert capsys.readouterr().out.strip() == expected("<image>What is it?").strip()
    assert main(base + ["--prompt", "<image>What is it?"]) == 2
    assert "--no-image-references" in capsys.readouterr().err
    assert main(base + ["--chat", "--image-references", "--prompt", "What is it?"]) == 2
    assert "--chat writes each --image as <image>" in capsys.readouterr().err
    # what the server refuses in a user's text (a reference to an image not given, EOS) is refused here too, not read
    # as a control token; a reference to the --image is read as the server reads it
    eos = loaded_processor.tokenizer.eos_token
    for text, what in (("Is <image1> red?", "<image1> refers to image 1, but the conversation shows only image 0"),
                       (f"Stop{eos} here", f"it may not contain {eos} (the tokenizer's ")):
        assert main(base + ["--chat", "--prompt", text]) == 2
        assert what in capsys.readouterr().err
    assert main(base + ["--chat", "--prompt", "Is <image0> red?"]) == 0
    named = fmt.render([Turn("user", ("<image>", "Is <image0> red?"))])
    assert capsys.readouterr().out.strip() == expected(named).strip()


def test_the_command_starts_without_other_packages_start_up_warnings():
    """torchao's optional kernels that a CPU build cannot load and torch's pytree deprecation are dropped by the
    command (before anything imports transformers); other warnings of the same loggers still show."""
    import logging

    from flamingo.runtime import quiet_irrelevant_warnings

    run = subprocess.run([sys.executable, "-m", "flamingo.cli", "tiny"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Failed to load" not in run.stderr and "is an Enum subclass" not in run.stderr, run.stderr[-2000:]
    quiet_irrelevant_warnings()
    quiet_irrelevant_warnings()  # once is enough: no second filter
    logger = logging.getLogger("torchao")
    assert len([f for f in logger.filters if getattr(f, "prefix", None) == "Failed to load "]) == 1
    kept = [r for r in (logger.makeRecord("torchao", logging.WARNING, __file__, 1, msg, (), None)
                        for msg in ("Failed to load /x/_C_mxfp8.so: no", "Detected no triton")) if logger.filter(r)]
    assert [r.msg for r in kept] == ["Detected no triton"]


def test_importing_the_cli_or_the_config_leaves_transformers_unloaded():
    code = "import sys, flamingo.cli, flamingo.config; print('transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr[-2000:]


def test_help_and_argument_parsing_import_neither_torch_nor_transformers():
    """`flamingo --help` and every subcommand's parser are built from plain data (task names, dataset kinds, dtype
    names): the library's stack is imported by the command that runs, so help answers at once."""
    code = ("import sys; from flamingo.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'flamingo.model.flamingo', 'flamingo.data.spec') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
    for command in (["--help"], ["eval", "--help"], ["data", "inspect", "--help"], ["batch", "--help"]):
        run = subprocess.run([sys.executable, "-m", "flamingo.cli", *command], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0 and "usage: flamingo" in run.stdout, run.stderr[-2000:]


def test_the_demos_help_imports_neither_torch_nor_transformers():
    """`flamingo demo --help` and `flamingo-demo --help` (the console script: `flamingo_demo.cli.main()`) answer at
    once, as every other subcommand's: the demo's stages, which load both, are imported when a run starts."""
    code = ("import sys; import flamingo.cli, flamingo_demo.cli\n"
            "for command in (lambda: flamingo.cli.main(['demo', '--help']), lambda: flamingo_demo.cli.main()):\n"
            "    try:\n        command()\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'flamingo_demo.demo') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("usage: ") == 2 and run.stdout.splitlines()[-1] == "[]"


def test_the_help_says_where_the_example_config_is(capsys):
    """A wheel holds no configs/: `flamingo --help` says where configs/example.yaml is."""
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "configs/example.yaml of the source repository and its sdist" in " ".join(capsys.readouterr().out.split())


def test_python_m_flamingo_is_the_command():
    """`python -m flamingo` where the console script is not on PATH; its help says where the example config is (a
    wheel does not hold configs/)."""
    run = subprocess.run([sys.executable, "-m", "flamingo", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: flamingo "), run.stderr[-2000:]
    assert "configs/example.yaml of the source repository and its sdist" in " ".join(run.stdout.split())
    run = subprocess.run([sys.executable, "-m", "flamingo", "tiny", "--xattn-every", "x"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "usage: flamingo tiny" in run.stderr


def test_batch_refuses_an_output_that_would_replace_its_input_before_any_model_work(tmp_path, capsys):
    """`--output` equal to `--input` (or a link to it) replaced the requests with the answers; a directory failed
    only after every request had run. Both are refused first (the model path does not even exist)."""
    requests = tmp_path / "req.jsonl"
    requests.write_text('{"custom_id": "a"}\n')
    (tmp_path / "link.jsonl").symlink_to(requests)
    base = ["batch", "--model", str(tmp_path / "no-model"), "--input", str(requests), "--output"]
    for output, why in ((requests, "is the input file"), (tmp_path / "link.jsonl", "is the input file"),
                        (tmp_path, "is a directory")):
        assert main([*base, str(output)]) == 2
        assert why in capsys.readouterr().err
    assert requests.read_text() == '{"custom_id": "a"}\n'


@pytest.mark.parametrize("option", ["--max-queue", "--prefill-chunk", "--max-tokens-cap", "--concurrency"])
def test_engine_sizes_below_one_are_refused_by_the_parser(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as stop:
        main(["batch", "--model", "m", "--input", "i", "--output", "o", option, "0"])
    assert stop.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,why", [("--max-body-mb", "-1", "must be a finite number > 0"),
                                              ("--max-video-seconds", "0", "must be a finite number > 0"),
                                              ("--max-video-seconds", "nan", "must be a finite number > 0"),
                                              ("--prefill-batch-tokens", "-3", "must be >= 0"),
                                              ("--prefix-cache-mib", "inf", "must be a finite number >= 0"),
                                              ("--vision-cache-mib", "nan", "must be a finite number >= 0")])
def test_limits_that_would_refuse_every_request_are_refused_by_the_parser(capsys, option, value, why):
    # --max-body-mb -1 started a server that answered every request with 413
    with pytest.raises(SystemExit) as stop:
        main(["batch", "--model", "m", "--input", "i", "--output", "o", option, value])
    assert stop.value.code == 2 and why in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_an_eval_cache_size_that_is_no_finite_number_is_refused_by_the_parser(capsys, value):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", "m", "--task", "vqa", "--data", "d", "--vision-cache-mb", value])
    assert stop.value.code == 2 and "must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unusable_device_is_refused_before_the_model_loads(tmp_path, capsys):
    for command in (["generate", "--prompt", "x"], ["serve"], ["eval", "--task", "vqa", "--data", str(tmp_path)]):
        for device, why in (("cuda", "use --device cpu"), ("gpu", "not a device torch knows")):
            assert main([*command, "--model", str(tmp_path / "no-model"), "--device", device]) == 2, command
            assert why in capsys.readouterr().err, command


def test_a_training_stopped_by_a_signal_exits_128_plus_its_number(monkeypatch, capsys):
    """A preempted run (SIGTERM: checkpoint written, no final model) must not look finished to a scheduler or to
    `flamingo train ... && flamingo eval ...`."""
    import flamingo.train.config as config_module
    import flamingo.train.trainer as trainer_module

    class Stopped:
        rank, world, stopped_by = 0, 1, 15

        def __init__(self, config):
            pass

        def run(self):
            return ""

    monkeypatch.setattr(config_module, "load_config", lambda path, overrides: type("C", (), {"train": type(
        "T", (), {"progress": False})})())
    monkeypatch.setattr(trainer_module, "Trainer", Stopped)
    assert main(["train", "config.yaml"]) == 143
    Stopped.stopped_by = 0
    assert main(["train", "config.yaml"]) == 0
