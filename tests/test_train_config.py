"""Training config parsing, overrides, and the lr schedule."""

import dataclasses
import json
import logging
import warnings

import pytest
import torch
import yaml

from flamingo.train.config import load_config, parse_config
from flamingo.train.optim import lr_lambda, param_groups


def test_example_config_parses_with_overrides():
    config = load_config("configs/example.yaml", ["train.steps=7", "optim.lr=3e-4", "data.1.batch_size=2",
                                                  "model.flamingo.xattn_every=2"])
    assert config.train.steps == 7 and config.optim.lr == 3e-4 and config.data[1].batch_size == 2
    assert config.model.flamingo["xattn_every"] == 2
    assert [d.name for d in config.data] == ["interleaved", "pairs", "video"]


def test_a_quoted_override_stays_text_as_the_quote_it_advice_says():
    """A string field YAML reads as a number is refused with "quote it"; on the command line a quoted value must then
    stay text, while an unquoted `3e-4` (a string to YAML 1.1) is still a number."""
    config = load_config("configs/example.yaml", ['train.output_dir="2024"', "data.0.name='7'", "optim.lr=3e-4",
                                                  'optim.weight_decay="0.05"'])
    assert config.train.output_dir == "2024" and config.data[0].name == "7"
    assert config.optim.lr == 3e-4 and config.optim.weight_decay == 0.05  # a float field reads a quoted number
    assert load_config("configs/example.yaml", ['train.steps="20"']).train.steps == 20  # and an integer field
    with pytest.raises(ValueError, match=r"train.output_dir must be a string, got 2024 .*quote it as written"):
        load_config("configs/example.yaml", ["train.output_dir=2024"])


def test_a_yaml_tag_in_an_override_reads_as_the_tag_says(tmp_path):
    """`!!str 2024` is YAML's own way to keep text: it was read back as the number 2024.0 and refused for a string
    field. `!!int`/`!!float` read as YAML says; a tag whose text it refuses is an error naming the value, in an
    override and in a file alike."""
    config = load_config("configs/example.yaml", ["train.output_dir=!!str 2024", "data.0.name=!!str 7",
                                                  "train.steps=!!int 20", "optim.lr=!!float 3e-4"])
    assert config.train.output_dir == "2024" and config.data[0].name == "7"
    assert config.train.steps == 20 and config.optim.lr == 3e-4
    for tagged in ("!!int abc", "!!int", "!!float", "!!bool maybe", "!!timestamp abc"):  # each constructor's error
        with pytest.raises(ValueError, match=rf"override 'train.steps={tagged}': the value '{tagged}' is not what "
                                             "its YAML tag says"):
            load_config("configs/example.yaml", [f"train.steps={tagged}"])
    with pytest.raises(ValueError, match="train.output_dir must be a string, got 2024"):
        load_config("configs/example.yaml", ["train.output_dir=!!int 2024"])
    path = tmp_path / "tagged.yaml"
    for tagged in ("!!int abc", "!!bool maybe"):
        path.write_text(f"data: [{{name: a, kind: pairs, path: x}}]\ntrain: {{steps: {tagged}}}\n")
        with pytest.raises(ValueError, match="tagged.yaml' has a value that is not what its YAML tag says"):
            load_config(str(path))


@pytest.mark.parametrize("options,message", [
    ({"shuffle_buffer": -1}, "option shuffle_buffer must be >= 0"),
    ({"remote_cache_gb": float("nan")}, "option remote_cache_gb must be a finite number > 0"),
    ({"max_tokenz": 8}, r"unknown options \['max_tokenz'\] for a 'pairs' dataset"),
    ({"padding_side": "middle"}, "padding_side must be 'left' or 'right'"),
])
def test_dataset_options_are_checked_with_the_config_before_anything_loads(options, message):
    """A dataset's options were checked when its stream was built, after the backbones had loaded."""
    raw = {"data": [{"name": "ok", "kind": "pairs", "path": "x"}, {"name": "b", "kind": "pairs", "path": "y",
                                                                   "options": options}]}
    with pytest.raises(ValueError, match=r"data\[1\] \('b'\): .*" + message):
        parse_config(raw)
    with pytest.raises(ValueError, match=r"validation\[0\] \('b'\): .*" + message):
        parse_config({**raw, "data": raw["data"][:1], "validation": raw["data"][1:]})


def test_unknown_keys_missing_datasets_and_unknown_mixture_are_errors():
    with pytest.raises(ValueError, match="unknown keys in train"):
        parse_config({"data": [{"name": "a", "kind": "pairs", "path": "x"}], "train": {"stepz": 1}})
    with pytest.raises(ValueError, match="no datasets"):
        parse_config({"train": {"steps": 1}})
    with pytest.raises(ValueError, match="mixture"):
        parse_config({"data": [{"name": "a", "kind": "pairs", "path": "x"}], "train": {"mixture": "roundrobin"}})
    for key, value in (("log_every", 0), ("save_every", -1)):
        with pytest.raises(ValueError, match=f"train.{key} must be"):
            parse_config({"data": [{"name": "a", "kind": "pairs", "path": "x"}], "train": {key: value}})


def test_warmup_then_constant_linear_or_cosine_schedule():
    const = lr_lambda("constant", 10, 100)
    assert const(0) == pytest.approx(0.1) and const(9) == 1.0 and const(50) == 1.0
    lin = lr_lambda("linear", 0, 100)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5) and lin(100) == 0.0
    cos = lr_lambda("cosine", 10, 110)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)


def test_weight_decay_only_on_xattn_matrices_and_gate_learning_rate(make_model):
    model, _ = make_model("llama")
    decay, no_decay, gates = param_groups(model, 0.1, lr=1e-3, gate_lr_mult=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and gates["weight_decay"] == 0.0
    assert all(names[id(p)].startswith("xattn.") and p.ndim == 2 for p in decay["params"])
    assert {names[id(p)] for p in gates["params"]} == {n for n in model.trainable_parameters() if n.endswith("_gate")}
    assert decay["lr"] == no_decay["lr"] == 1e-3 and gates["lr"] == pytest.approx(1e-2)
    assert {names[id(p)] for p in decay["params"] + no_decay["params"] + gates["params"]} == \
        set(model.trainable_parameters())
    assert not any(torch.equal(p, q) and p is q for p in decay["params"] for q in no_decay["params"])

    # The attention gates can get their own multiplier; the dense gates keep gate_lr_mult.
    *_, dense_gates, attn_gates = param_groups(model, 0.1, lr=1e-3, gate_lr_mult=10.0, attn_gate_lr_mult=2.0)
    assert {names[id(p)].rsplit(".", 1)[-1] for p in attn_gates["params"]} == {"attn_gate"}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in dense_gates["params"]} == {"ffw_gate"}
    assert attn_gates["lr"] == pytest.approx(2e-3) and dense_gates["lr"] == pytest.approx(1e-2)
    assert len(attn_gates["params"]) == len(dense_gates["params"]) == len(model.xattn)


DATA = [{"name": "a", "kind": "pairs", "path": "x", "batch_size": 4}]


@pytest.mark.parametrize("key,value", [("micro_batches", 0), ("max_nonfinite", 0), ("num_workers", -1)])
def test_counts_below_their_least_value_are_refused(key, value):
    # micro_batches 0 divided by zero at the first step; max_nonfinite 0 aborted it before any non-finite loss
    with pytest.raises(ValueError, match=f"train.{key} must be >= "):
        parse_config({"data": DATA, "train": {key: value}})


def test_frozen_dtype_needs_bf16_autocast():
    """bf16 frozen backbones meet the float32 blocks only under autocast: with precision fp32 step 1 failed inside
    torch (fp16 too, and fp16 under bf16 autocast has no CPU kernel)."""
    parse_config({"data": DATA, "train": {"frozen_dtype": "bf16", "precision": "bf16"}})
    with pytest.raises(ValueError, match="set train.precision: bf16"):
        parse_config({"data": DATA, "train": {"frozen_dtype": "bf16"}})
    for bad in ("fp16", "float16"):
        with pytest.raises(ValueError, match=f"train.frozen_dtype must be bf16, fp32 or null, got '{bad}'"):
            parse_config({"data": DATA, "train": {"frozen_dtype": bad, "precision": "bf16"}})


def test_numbers_and_flags_of_the_wrong_type_are_refused_by_name():
    for overrides, message in ((["train.steps=abc"], "train.steps must be an integer"),
                               (["data.0.batch_size=abc"], r"data\[0\].batch_size must be an integer"),
                               (["optim.lr=abc"], "optim.lr must be a number"),
                               (["train.compile=maybe"], "train.compile must be true or false"),
                               (["train.steps=true"], "train.steps must be an integer")):
        with pytest.raises(ValueError, match=message):
            load_config("configs/example.yaml", overrides)
    config = load_config("configs/example.yaml", ["train.steps=1e3", "optim.lr=3e-4", "train.device=null"])
    assert config.train.steps == 1000 and isinstance(config.train.steps, int) and config.optim.lr == 3e-4


def test_micro_batches_that_cannot_split_every_batch_are_refused_before_training():
    # a partial last batch (drop_last false) would stop the run at the end of its first epoch
    with pytest.raises(ValueError, match=r"\['a'\] have batches that train.micro_batches=2 cannot split"):
        parse_config({"data": [{**DATA[0], "options": {"drop_last": False}}], "train": {"micro_batches": 2}})
    with pytest.raises(ValueError, match="train.micro_batches=3 cannot split"):
        parse_config({"data": DATA, "train": {"micro_batches": 3}})
    assert parse_config({"data": DATA, "train": {"micro_batches": 2}}).train.micro_batches == 2


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "distributed", "fdsp", "train.distributed must be ddp or fsdp, got 'fdsp'"),
    ("train", "fsdp_frozen", "replicated", "train.fsdp_frozen must be shard or replicate"),
    ("schedule", "kind", "cosin", "schedule.kind must be constant, linear or cosine, got 'cosin'"),
    ("schedule", "warmup_steps", -1, "schedule.warmup_steps must be >= 0"),
    ("optim", "betas", 0.9, r"optim.betas must be two numbers in \[0, 1\)"),
    ("optim", "betas", [0.9], r"optim.betas must be two numbers"),
    ("optim", "betas", [0.9, 1.5], r"optim.betas must be two numbers"),
    ("train", "steps", 0, "train.steps must be >= 1"),
    ("train", "keep_last", -1, r"train.keep_last must be >= 0 \(0: keep every checkpoint\)"),
])
def test_misspelled_choices_and_meaningless_values_are_refused_by_name(section, key, value, message):
    """`distributed: fdsp` ran as DDP; betas 0.9 and a misspelled schedule failed as tracebacks (or after the model
    was built); steps 0 'trained' an untrained model; a negative keep_last kept every checkpoint."""
    with pytest.raises(ValueError, match=message):
        parse_config({"data": DATA, section: {key: value}})


def test_unknown_model_flamingo_keys_and_non_finite_loss_weights_are_refused():
    with pytest.raises(ValueError, match=r"unknown keys in model.flamingo: \['xattn_evry'\]"):
        parse_config({"data": DATA, "model": {"flamingo": {"xattn_evry": 2}}})
    with pytest.raises(ValueError, match="model.flamingo must be a mapping"):
        parse_config({"data": DATA, "model": {"flamingo": [1]}})
    for weight in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"data\[0\].loss_weight must be a finite number"):
            parse_config({"data": [{**DATA[0], "loss_weight": weight}]})
    config = parse_config({"data": DATA, "model": {"flamingo": {"xattn_every": 2}}, "optim": {"betas": [0.8, 0.9]}})
    assert config.optim.betas == (0.8, 0.9) and config.model.flamingo == {"xattn_every": 2}


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "optim.eps=-inf", "train.grad_clip=nan",
                                      "optim.gate_lr_mult=.inf", "train.cache_vision_features_mib=nan"])
def test_non_finite_numbers_are_refused_by_name(tmp_path, override):
    """`optim.lr=inf` started a run and wrote Infinity into train_config.json; nan failed once the optimizer was
    built, after the model had loaded."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": DATA}))
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key} must be a finite number, got (inf|-inf|nan)"):
        load_config(str(path), [override])


def test_settings_that_do_nothing_are_said(caplog, monkeypatch):
    """eval_every / eval_batches without validation sets compute nothing; a warmup longer than the run never reaches
    the lr: both are allowed, and said, once per run: by rank 0 (every torchrun rank parses the config)."""
    raw = {"data": DATA, "train": {"eval_every": 10, "steps": 5}, "schedule": {"warmup_steps": 10}}
    with caplog.at_level(logging.WARNING, logger="flamingo.train.config"):
        parse_config(raw)
    assert "no `validation` datasets" in caplog.text and "warmup_steps=10 is longer than train.steps=5" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING, logger="flamingo.train.config"):
        parse_config(raw)
    assert caplog.text == ""
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with caplog.at_level(logging.WARNING, logger="flamingo.train.config"):
        parse_config({"data": DATA, "validation": DATA, "train": {"eval_every": 10, "steps": 50}})
    assert caplog.text == ""


@pytest.mark.parametrize("override,message", [
    ("optim.weight_decay=-0.1", r"optim.weight_decay must be >= 0 \(0: no decay\), got -0.1"),
    ("optim.gate_lr_mult=-1", "optim.gate_lr_mult must be >= 0"),
    ("optim.attn_gate_lr_mult=-2", "optim.attn_gate_lr_mult must be >= 0 or null"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.eps=0", "optim.eps must be > 0"),
])
def test_optimizer_values_out_of_range_are_refused_by_name(override, message):
    """torch's AdamW never checks the per-group values we set: weight_decay -0.1 grew the weights and gate_lr_mult -1
    ran the gates up the loss, silently."""
    with pytest.raises(ValueError, match=message):
        load_config("configs/example.yaml", [override])
    zero = load_config("configs/example.yaml", ["optim.weight_decay=0", "optim.gate_lr_mult=0"])  # off / fixed gates
    assert zero.optim.weight_decay == 0 and zero.optim.gate_lr_mult == 0


@pytest.mark.parametrize("change,message", [
    (lambda r: r["data"][0].pop("path"), r"data\[0\] needs path \(required: name, kind, path\)"),
    (lambda r: r["data"][0].update(options=["max_tokens", 32]), r"data\[0\].options must be a mapping"),
    (lambda r: r.update(data={"name": "a", "kind": "pairs", "path": "x"}), "data must be a list of datasets"),
    (lambda r: r.update(data=["x.jsonl"]), r"data\[0\] must be a mapping"),
    (lambda r: r.update(train=5), "train must be a mapping"),
    (lambda r: r.update(optim=[1]), "optim must be a mapping"),
    (lambda r: r.update(validation={"name": "v"}), "validation must be a list of datasets"),
    (lambda r: r.update(validation=[{"name": "v", "kind": "pairs"}]), r"validation\[0\] needs path"),
    (lambda r: r.update(validation=[{**DATA[0], "options": [1]}]), r"validation\[0\].options must be a mapping"),
], ids=["no-path", "options-list", "data-mapping", "data-entry-string", "train-number", "optim-list",
        "validation-mapping", "validation-no-path", "validation-options-list"])
def test_config_structure_mistakes_are_refused_by_key(change, message):
    """A dataset without its path, options as a list, a section that is no mapping: ValueErrors naming the key (the
    CLI's one-line error), not TypeErrors from the dataclasses."""
    raw = {"model": {"vision": "v", "lm": "l"}, "data": [dict(DATA[0])]}
    change(raw)
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def test_overrides_and_files_of_the_wrong_shape_are_refused_by_key(tmp_path):
    for override, message in (("data.5.batch_size=4", r"'5' is not an index of a list of 3 entries \(0 to 2\)"),
                              ("data.x.batch_size=4", "'x' is not an index"),
                              ("optim.lr.x=1", "optim.lr is 0.0001, not a section")):
        with pytest.raises(ValueError, match=rf"override {override.split('=')[0]}: {message}"):
            load_config("configs/example.yaml", [override])
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([DATA[0]]))
    with pytest.raises(ValueError, match="the config must be a mapping of sections"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"data": [{**DATA[0], "options": None}], "train": None}))  # `train:` left empty
    assert load_config(str(path)).data[0].options is None
    config = load_config(str(path), ["train.steps=5", "data.0.options.max_tokens=32"])
    assert config.train.steps == 5 and config.data[0].options == {"max_tokens": 32}


def test_train_command_prints_a_structure_mistake_as_one_line(tmp_path, capsys):
    from flamingo.cli import main

    path = tmp_path / "nopath.yaml"
    path.write_text(yaml.safe_dump({"model": {"vision": "v", "lm": "l"}, "data": [{"name": "a", "kind": "pairs"}]}))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == "flamingo: error: data[0] needs path (required: name, kind, path)\n"


@pytest.mark.parametrize("device,message", [
    ("cpux", "train.device 'cpux': not a device torch knows"),
    ("cuda", r"train.device 'cuda': .*; use train.device=cpu"),
    ("meta", "train.device 'meta': the meta device holds shapes"),
])
def test_train_device_is_checked_like_device_before_anything_loads(monkeypatch, device, message):
    """`train.device` a name torch does not know, or CUDA on a machine without it: refused by name when the config
    loads, as every command's `--device` is, not a torch traceback inside the Trainer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        load_config("configs/example.yaml", [f"train.device={device}"])
    assert load_config("configs/example.yaml", ["train.device=cpu"]).train.device == "cpu"


def test_init_from_with_backbones_tokenizer_or_new_model_options_is_refused_with_how_to_clear_them():
    """With model.init_from the model is the one it names: model.vision / lm / tokenizer and the model.flamingo
    options that shape a new model would go unused, so they are refused, with the overrides that clear them
    (configs/example.yaml sets vision, lm and model.flamingo); quantize_frozen and lm_lora apply and stay."""
    with pytest.raises(ValueError, match=r"^model.vision, model.lm, model.flamingo \['freeze_lm', .*'xattn_every'\] "
                                         r"are set, but with model.init_from .*model.vision=null model.lm=null "
                                         r"'model.flamingo=\{\}'"):
        load_config("configs/example.yaml", ["model.init_from=saved"])
    for model, named in (({"lm": "/copy/of/lm"}, "model.lm is set"), ({"tokenizer": "tok"}, "model.tokenizer is set"),
                         ({"flamingo": {"num_latents": 8}}, r"model.flamingo \['num_latents'\] is set")):
        with pytest.raises(ValueError, match=named):
            parse_config({"data": DATA, "model": {"init_from": "saved", **model}})
    config = load_config("configs/example.yaml", ["model.init_from=saved", "model.vision=null", "model.lm=null",
                                                  "model.flamingo={}", "model.flamingo.quantize_frozen=int8"])
    assert config.model.init_from == "saved" and config.model.flamingo == {"quantize_frozen": "int8"}


def test_a_dataset_without_a_path_is_refused_naming_it_and_the_key_to_set():
    """configs/mini.yaml ships `path: null` (the demo fills the paths in): loaded as it is, it names the dataset and
    the override, rather than reading a file named `None` after both backbones load."""
    with pytest.raises(ValueError, match=r"^data\[0\] \('interleaved'\) needs a path .*got None: set it in the config "
                                         r"or as data.0.path=\.\.\.$"):
        load_config("configs/mini.yaml", ["model.vision=v", "model.lm=l"])
    for path in ("", 3, ["a.jsonl"]):
        with pytest.raises(ValueError, match=r"validation\[0\] \('v'\) needs a path"):
            parse_config({"data": DATA, "validation": [{"name": "v", "kind": "pairs", "path": path}]})
    paths = [f"data.{i}.path=d{i}.jsonl" for i in range(5)]
    assert [d.path for d in load_config("configs/mini.yaml", paths).data] == [f"d{i}.jsonl" for i in range(5)]
    from flamingo.data.sources import expand_path

    for path in (None, 3, ""):  # a DatasetSection built in Python reaches the loader unchecked
        with pytest.raises(ValueError, match=rf"a dataset path must be a file, .*got {path!r}"):
            expand_path(path)


def test_string_fields_yaml_reads_as_numbers_or_dates_and_output_dirs_that_are_files_are_refused(tmp_path):
    """`output_dir: 2024` (an int to YAML) or `2024-06-01` (a date) crashed with a TypeError once the model was
    built, as did an output_dir naming a file (FileExistsError); each is refused naming the key, with how to quote."""
    import datetime
    import re

    data = [{"name": "a", "kind": "pairs", "path": "x"}]
    for section, key, value, why in (
            ("train", "output_dir", 2024, "got 2024 (YAML reads it as an integer: quote it as written to keep it "
                                          "text)"),
            ("train", "output_dir", 1.1, "got 1.1 (YAML reads it as a number: quote it as written to keep it text)"),
            ("train", "output_dir", datetime.date(2024, 6, 1), "(YAML reads it as a date: quote it, \"2024-06-01\","),
            ("model", "lm", 5, "or null, got 5"),
            ("train", "precision", True, "got True (YAML reads it as a flag")):
        with pytest.raises(ValueError, match=rf"^{section}.{key} must be a string.*{re.escape(why)}"):
            parse_config({"data": data, section: {key: value}})
    with pytest.raises(ValueError, match=r"^data\[0\].name must be a string, got 7"):
        parse_config({"data": [{"name": 7, "kind": "pairs", "path": "x"}]})
    (tmp_path / "f").write_text("x")
    for output_dir, why in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "run", "goes through the file"),
                            ("", "an empty path")):
        with pytest.raises(ValueError, match=f"train.output_dir.*{why}"):
            parse_config({"data": data, "train": {"output_dir": str(output_dir)}})
    assert parse_config({"data": data, "train": {"output_dir": str(tmp_path / "new")}}).train.output_dir


def test_a_home_directory_in_a_path_field_is_expanded_as_in_data_paths(monkeypatch, tmp_path):
    """A YAML value is no shell word: `~/runs/x` was taken as a directory named `~` in the working directory (the
    run written there), and a tower `~/towers/clip` was not found, while the datasets' paths expand `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config("configs/example.yaml", [
        "train.output_dir=~/runs/x", "model.vision=~/towers/clip", "model.lm=~/lms/llama", "model.tokenizer=~/tok",
        "data.0.options.image_dir=~/images", "data.1.options.remote_cache_dir=~/shards"])
    assert config.train.output_dir == str(tmp_path / "runs" / "x")
    assert config.model.vision == str(tmp_path / "towers" / "clip")
    assert config.model.lm == str(tmp_path / "lms" / "llama") and config.model.tokenizer == str(tmp_path / "tok")
    assert config.data[0].options["image_dir"] == str(tmp_path / "images")
    assert config.data[1].options["remote_cache_dir"] == str(tmp_path / "shards")
    assert load_config("configs/example.yaml", ["model.lm=org/name~1"]).model.lm == "org/name~1"  # not a path


def _parsed_warning_free(path: str, overrides: tuple[str, ...] = ()):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        return load_config(path, list(overrides))


def test_the_mib_caches_are_spelled_mib_in_the_shipped_configs():
    """The shipped configs use the current names: parsing them warns of no earlier spelling."""
    assert _parsed_warning_free("configs/example.yaml").train.cache_vision_features_mib == 0
    mini = _parsed_warning_free("configs/mini.yaml", tuple(f"data.{i}.path=x" for i in range(5)))  # the demo's
    assert mini.train.cache_vision_features_mib == 768 and mini.data[0].options["cache_media_mib"] == 96


def test_a_run_config_with_the_mb_spellings_still_loads_under_the_mib_names(tmp_path):
    """`train.cache_vision_features_mb` and the datasets' `cache_media_mb` were MiB spelled _mb: renamed _mib, a
    config (or a run's train_config.json, which a resume may be pointed at) written with the old names loads with
    the same values, each old name said by a FutureWarning naming the new one."""
    old = parse_config({"data": [{**DATA[0], "options": {"cache_media_mib": 8}}],
                        "train": {"cache_vision_features_mib": 64}})
    saved = json.loads(json.dumps(dataclasses.asdict(old)))  # train_config.json, as the trainer writes it
    saved["train"]["cache_vision_features_mb"] = saved["train"].pop("cache_vision_features_mib")
    saved["data"][0]["options"] = {"cache_media_mb": 8}
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(saved))
    with pytest.warns(FutureWarning) as said:
        config = load_config(str(path))
    assert config == old  # the same settings, under the current names (a train_config.json written again: _mib)
    messages = sorted(str(w.message) for w in said)
    assert messages == ["data[0] option cache_media_mb is now spelled cache_media_mib (the same MiB): rename it; the "
                        "old name is still read",
                        "train.cache_vision_features_mb is now spelled cache_vision_features_mib (the same MiB): "
                        "rename it; the old name is still read"]
    assert all(w.filename == __file__ for w in said)  # the user's line (warn_outside), not flamingo's


def test_an_mb_override_reads_as_the_mib_key_and_is_checked_as_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": DATA}))
    with pytest.warns(FutureWarning, match="train.cache_vision_features_mb is now spelled cache_vision_features_mib"):
        assert load_config(str(path), ["train.cache_vision_features_mb=32"]).train.cache_vision_features_mib == 32
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="train.cache_vision_features_mib must be a "
                                                                      "finite number, got nan"):
        load_config(str(path), ["train.cache_vision_features_mb=nan"])


def test_an_override_replaces_the_files_value_under_the_other_spelling(tmp_path):
    """An override under one spelling of a renamed key, on a file holding the other (an old script's _mb on the
    shipped configs; a run saved with _mb resumed with a _mib override), replaces the file's value: it was refused as
    the one setting given twice."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": [{**DATA[0], "options": {"cache_media_mib": 8}}],
                                    "train": {"cache_vision_features_mib": 64}}))
    with pytest.warns(FutureWarning):
        config = load_config(str(path), ["train.cache_vision_features_mb=32", "data.0.options.cache_media_mb=4"])
    assert config.train.cache_vision_features_mib == 32 and config.data[0].options["cache_media_mib"] == 4
    path.write_text(yaml.safe_dump({"data": [{**DATA[0], "options": {"cache_media_mb": 8}}],
                                    "train": {"cache_vision_features_mb": 64}}))
    config = load_config(str(path), ["train.cache_vision_features_mib=16", "data.0.options.cache_media_mib=2"])
    assert config.train.cache_vision_features_mib == 16 and config.data[0].options["cache_media_mib"] == 2


@pytest.mark.parametrize("raw,message", [
    ({"data": DATA, "train": {"cache_vision_features_mb": 8, "cache_vision_features_mib": 8}},
     "train.cache_vision_features_mb and cache_vision_features_mib are one setting .*give cache_vision_features_mib "
     "only"),
    ({"data": [{**DATA[0], "options": {"cache_media_mb": 8, "cache_media_mib": 16}}]},
     r"data\[0\] option cache_media_mb and cache_media_mib are one setting .*give cache_media_mib only"),
    ({"data": DATA, "validation": [{**DATA[0], "options": {"cache_media_mb": 8, "cache_media_mib": 8}}]},
     r"validation\[0\] option cache_media_mb and cache_media_mib are one setting"),
])
def test_both_spellings_of_a_cache_are_refused(raw, message):
    """Which one holds would be a guess (a config with the new name and an override with the old one, say)."""
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def test_only_rank_0_warns_of_an_old_spelling(monkeypatch):
    """Every torchrun rank parses the config: one warning, from rank 0, as the config's other warnings."""
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = parse_config({"data": DATA, "train": {"cache_vision_features_mb": 8}})
    assert config.train.cache_vision_features_mib == 8


def test_a_dataset_built_outside_a_config_reads_the_mb_option_too():
    """`DatasetSection(options={"cache_media_mb": ...})` handed to the data API is resolved by the same rule."""
    from flamingo.data.kinds import resolve_options

    with pytest.warns(FutureWarning, match="option cache_media_mb is now spelled cache_media_mib"):
        resolved = resolve_options("pairs", {"cache_media_mb": 8})
    assert resolved["cache_media_mib"] == 8 and "cache_media_mb" not in resolved
    with pytest.raises(ValueError, match="option cache_media_mb and cache_media_mib are one setting"):
        resolve_options("pairs", {"cache_media_mb": 8, "cache_media_mib": 8})
