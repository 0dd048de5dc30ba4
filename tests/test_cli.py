"""The `flamingo` command: the README's smoke run, generation from a saved model, clear errors."""

import pytest

from flamingo import from_backbones
from flamingo.cli import main
from flamingo.tiny import random_image, set_gates, tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision


def test_tiny_command_runs_and_checks_masking(capsys):
    assert main(["tiny"]) == 0
    assert '"tokens_before_2nd_image_unchanged_when_it_changes": true' in capsys.readouterr().out


@pytest.fixture
def saved_model(tmp_path):
    tok = tiny_tokenizer()
    model, processor = from_backbones(tiny_vision("clip"), tiny_lm("llama", vocab_size=len(tok)), tok,
                                      tiny_flamingo_config(), image_processor=tiny_image_processor("clip"))
    set_gates(model, 0.5)
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    random_image(0).save(tmp_path / "a.png")
    return tmp_path


def test_generate_command(saved_model, capsys):
    d = saved_model
    args = ["generate", "--model", str(d / "model"), "--prompt", "<image>Question: what? Answer:",
            "--image", str(d / "a.png"), "--max-new-tokens", "4"]
    assert main(args) == 0
    assert main(args + ["--num-beams", "2", "--dtype", "bf16"]) == 0
    assert main(args + ["--sample", "--top-k", "5"]) == 0


def test_generate_command_prints_what_the_api_generates(saved_model, capsys):
    """The streamed greedy answer is the API's; `--sample --seed S --num-return-sequences 3` prints the three
    sequences the API samples under that seed, one per line, the same on a rerun."""
    import torch

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


def test_generate_command_clear_errors(saved_model, capsys):
    d = saved_model
    base = ["generate", "--model", str(d / "model"), "--max-new-tokens", "2"]
    assert main(base + ["--prompt", "<image><image>x", "--image", str(d / "a.png")]) == 2
    assert "placeholder" in capsys.readouterr().err
    assert main(base + ["--prompt", "<image>x", "--image", str(d / "missing.png")]) == 2
    assert "not found" in capsys.readouterr().err
    (d / "bad.png").write_bytes(b"garbage")
    assert main(base + ["--prompt", "<image>x", "--image", str(d / "bad.png")]) == 2
    assert "cannot decode" in capsys.readouterr().err
