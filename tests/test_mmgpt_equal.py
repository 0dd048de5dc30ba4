"""Equal to Multimodal-GPT (mmgpt 0.0.1: OpenFlamingo v1 + PEFT LoRA on its LM and blocks): its LoRA file converted
on top of an OpenFlamingo v1 checkpoint gives mmgpt's logits and greedy tokens on the same backbones, with the LM's
adapters kept (lm_lora) or merged, from the file forms PEFT has written, and through `flamingo convert mmgpt`.

mmgpt is installed with `pip install --no-deps mmgpt==0.0.1` (flamingo/peers/mmgpt.py)."""

import copy
import functools
import http.server
import threading

import pytest
import torch

pytestmark = pytest.mark.peer
pytest.importorskip("einops_exts", reason="the Multimodal-GPT peer needs einops-exts")
pytest.importorskip("peft", reason="Multimodal-GPT's LoRA needs peft")
if __import__("importlib.util").util.find_spec("mmgpt") is None:
    pytest.skip("Multimodal-GPT is not installed (pip install --no-deps mmgpt==0.0.1)", allow_module_level=True)
from flamingo.chat import MMGPT_PREAMBLE, Turn, chat_format_for  # noqa: E402
from flamingo.convert import convert_mmgpt  # noqa: E402
from flamingo.model.generation import generate  # noqa: E402
from flamingo.peers.mmgpt import LORA_CONFIG, apply_mmgpt_lora, load_mmgpt_modules  # noqa: E402
from flamingo.tiny import random_image, tiny_image_processor  # noqa: E402

from helpers import continuous_batch_greedy, hub_cache_entry, openflamingo_peer  # noqa: E402

# Multimodal-GPT's own format (its app.py and instruction data), one image each.
PROMPTS = [MMGPT_PREAMBLE + "\n\n### Image:\n<image>\n\n### Instruction:\nWhat is in the image?\n\n### Response:\n",
           MMGPT_PREAMBLE + "\n\n### Image:\n<image>\n\n### Instruction:\nDescribe it.\n\n### Response:\nA red"]
MEDIA = [[random_image(0)], [random_image(1)]]


def _mmgpt(every: int = 2, seed: int = 0):
    """(Multimodal-GPT peer with random LoRA tensors, its OpenFlamingo v1 base state, its LoRA file, backbones)."""
    peer, vision, lm, tok = openflamingo_peer(every, seed, modules=load_mmgpt_modules(), attn_gates=(0.5, 1.0))
    base = {k: v.clone() for k, v in peer.state_dict().items()}  # a whole v1 state_dict(), as the v1 tests use
    apply_mmgpt_lora(peer)
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.2)
    # what mmgpt's training saves: its trained (LoRA) tensors, behind DDP's `module.`, and its tuning config
    lora = {"module." + k: v.clone() for k, v in peer.state_dict().items() if ".lora_" in k}
    return peer.eval(), base, {"model_state_dict": lora, "tuning_config": dict(LORA_CONFIG)}, (vision, lm, tok)


def _convert(base, finetune, backbones, **kwargs):
    vision, lm, tok = backbones
    return convert_mmgpt(copy.deepcopy(finetune), copy.deepcopy(base), copy.deepcopy(lm), copy.deepcopy(tok),
                         vision=copy.deepcopy(vision), image_processor=tiny_image_processor("clip"), **kwargs)


def _peer_logits(peer, batch):
    with torch.no_grad():
        return peer(vision_x=batch["images"].clone(), lang_x=batch["input_ids"],
                    attention_mask=batch["attention_mask"]).logits


def _max_diff(model, peer, processor) -> float:
    batch = processor(PROMPTS, images=MEDIA, padding_side="right")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        mine = model(**batch).logits
    return float((mine[real] - _peer_logits(peer, batch)[real]).abs().max())


@pytest.fixture(scope="module")
def mmgpt():
    peer, base, finetune, backbones = _mmgpt()
    ours, processor = _convert(base, finetune, backbones)
    return peer, ours, processor, base, finetune, backbones


def test_logits_equal_mmgpt(mmgpt):
    peer, ours, processor, base, finetune, backbones = mmgpt
    assert ours.config.attend_next_image and processor.template == "mmgpt"
    assert ours.config.lm_lora == {"r": 16, "alpha": 16.0, "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
                                   "dropout": 0.0}
    assert _max_diff(ours, peer, processor) <= 1e-5
    # Not vacuous: without the LoRA tensors (the base OpenFlamingo v1 alone) the logits differ
    no_lora = copy.deepcopy(finetune)
    for key, value in no_lora["model_state_dict"].items():
        if ".lora_B" in key:
            value.zero_()
    bare, _ = _convert(base, no_lora, backbones)
    assert _max_diff(bare, peer, processor) > 1e-3


def test_generate_equals_mmgpt(mmgpt):
    peer, ours, processor, *_ = mmgpt
    batch = processor(PROMPTS, images=MEDIA, padding_side="left")
    mine = generate(ours, batch["input_ids"], batch["attention_mask"], batch["images"], batch["num_media"],
                    max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        theirs = peer.generate(batch["images"].clone(), batch["input_ids"], batch["attention_mask"],
                               max_new_tokens=6, num_beams=1)
    n = min(mine.shape[1], theirs.shape[1])
    assert n > batch["input_ids"].shape[1] + 1
    assert torch.equal(mine[:, :n], theirs[:, :n])


TEXT_ONLY = MMGPT_PREAMBLE + "\n\n### Instruction:\nWrite a haiku.\n\n### Response:\n"


def _peer_text_only(peer, input_ids, attention_mask, generate_tokens: int = 0):
    """Multimodal-GPT on a prompt without an image: its LM alone (its forward with `vision_x=None`; its demo's
    `condition_only_lang_x` around the LM's `generate`)."""
    with torch.no_grad():
        if not generate_tokens:
            return peer(vision_x=None, lang_x=input_ids, attention_mask=attention_mask).logits
        layers = peer.lang_encoder._get_decoder_layers()
        for layer in layers:
            layer.condition_only_lang_x(True)
        try:
            return peer.lang_encoder.generate(input_ids=input_ids, attention_mask=attention_mask,
                                              max_new_tokens=generate_tokens, num_beams=1, do_sample=False)
        finally:
            for layer in layers:
                layer.condition_only_lang_x(False)


def test_prompts_without_an_image_run_the_lm_alone(mmgpt):
    """As Multimodal-GPT computes a prompt without an image (its LM alone, adapters included), per row: in a batch
    beside an image prompt, in `generate`, and in the server's continuous batch."""
    peer, ours, processor, base, finetune, backbones = mmgpt
    assert ours.config.imageless_rows_skip_blocks
    batch = processor([TEXT_ONLY, PROMPTS[0]], images=[[], MEDIA[0]], padding_side="right")
    with torch.no_grad():
        mine = ours(**batch).logits
    n = int(batch["attention_mask"][0].sum())
    text = _peer_text_only(peer, batch["input_ids"][:1, :n], batch["attention_mask"][:1, :n])
    assert (mine[0, :n] - text[0]).abs().max() <= 1e-5
    m = int(batch["attention_mask"][1].sum())
    alone = processor(PROMPTS[0], images=MEDIA[0])
    assert (mine[1, :m] - _peer_logits(peer, alone)[0]).abs().max() <= 1e-5
    # Not vacuous: the blocks' dense layers (Flamingo's rule for text that sees no image) give other logits
    flamingo_rule = copy.deepcopy(ours)
    flamingo_rule.config.imageless_rows_skip_blocks = False
    with torch.no_grad():
        assert (flamingo_rule(**batch).logits[0, :n] - text[0]).abs().max() > 1e-3

    single = processor(TEXT_ONLY)
    mine = generate(ours, single["input_ids"], single["attention_mask"], max_new_tokens=6, do_sample=False)
    theirs = _peer_text_only(peer, single["input_ids"], single["attention_mask"], generate_tokens=6)
    k = min(mine.shape[1], theirs.shape[1])
    assert k > single["input_ids"].shape[1] + 1 and torch.equal(mine[:, :k], theirs[:, :k])


@pytest.mark.skipif(not __import__("flamingo.runtime.compat", fromlist=["x"]).CONTINUOUS_BATCHING,
                    reason="the server's prefill needs transformers >= 5.4")
def test_continuous_batch_mixes_text_only_and_image_rows(mmgpt):
    """The server's path (chunked prefill, then a `DecodeBatch` of a text-only and an image row) gives each prompt
    the greedy tokens `generate` gives it alone, and the text-only row Multimodal-GPT's."""
    peer, ours, processor, *_ = mmgpt
    steps, prompts = 5, [(TEXT_ONLY, []), (PROMPTS[0], MEDIA[0])]
    rows = continuous_batch_greedy(ours, processor, prompts, steps, chunk=7)
    for (prompt, media), got in zip(prompts, rows):
        b = processor(prompt, images=media or None)
        alone = ours.generate(**b, max_new_tokens=steps, min_new_tokens=steps)[0, b["input_ids"].shape[1]:]
        assert got == alone.tolist()
    text = processor(TEXT_ONLY)
    theirs = _peer_text_only(peer, text["input_ids"], text["attention_mask"], steps)[0, text["input_ids"].shape[1]:]
    assert len(theirs) > 1 and rows[0][:len(theirs)] == theirs.tolist()  # and the text-only row is mmgpt's


def test_merged_adapters_and_peft_key_forms(mmgpt):
    """The LM's adapters merged into it give the same logits; a file from PEFT before adapter names (`lora_A.weight`)
    without DDP's prefix, its blocks named under `gated_cross_attn_layers`, converts to the same model."""
    peer, _, processor, base, finetune, backbones = mmgpt
    merged, _ = _convert(base, finetune, backbones, merge_lm_lora=True)
    assert merged.config.lm_lora is None and not any(".lora_" in n for n, _ in merged.named_parameters())
    assert _max_diff(merged, peer, processor) <= 1e-5

    old = {}
    for key, value in finetune["model_state_dict"].items():
        key = key.removeprefix("module.").replace(".default.weight", ".weight")
        key = key.replace("model.layers.1.gated_cross_attn_layer.", "gated_cross_attn_layers.1.")
        old[key] = value
    assert any(k.startswith("lang_encoder.base_model.model.gated_cross_attn_layers.1.") for k in old)
    older, _ = _convert(base, {"model_state_dict": old, "tuning_config": finetune["tuning_config"]}, backbones)
    assert _max_diff(older, peer, processor) <= 1e-5


def test_bad_files_are_refused(mmgpt):
    _, _, _, base, finetune, backbones = mmgpt
    no_alpha = copy.deepcopy(finetune)
    del no_alpha["tuning_config"]["lora_alpha"]
    with pytest.raises(ValueError, match="lora_alpha"):
        _convert(base, no_alpha, backbones)
    unpaired = copy.deepcopy(finetune)
    unpaired["model_state_dict"] = {k: v for k, v in unpaired["model_state_dict"].items() if ".lora_B" not in k}
    with pytest.raises(ValueError, match="without their pair"):
        _convert(base, unpaired, backbones)
    with pytest.raises(ValueError, match="no LoRA tensors"):
        _convert(base, {"model_state_dict": {"module.perceiver.latents": torch.zeros(2, 2)}}, backbones)




def _mmengine_classes(addict_era: bool):
    """Classes that pickle as mmengine's `Config` and `ConfigDict` do (under their module and names): what
    Multimodal-GPT's training saves as `tuning_config`. `addict_era`: ConfigDict pickled by addict's protocol (its
    2023 releases), else by mmengine's later `__reduce_ex__`."""
    import types

    module = types.ModuleType("mmengine.config.config")

    class ConfigDict(dict):
        def __getnewargs__(self):
            return tuple(self.items())

        def __getstate__(self):
            return self

        def __setstate__(self, state):
            self.update(state)

        if not addict_era:
            def __reduce_ex__(self, proto):
                return self.__class__, (dict(self),), None, None, None, None

    class Config:
        def __init__(self, cfg):
            self._cfg_dict, self._filename, self._text = ConfigDict(cfg), "lora_config.py", "..."
            self._env_variables, self._format_python_code, self._imported_names = {}, True, set()

        def __getstate__(self):
            return (self._cfg_dict, self._filename, self._text, self._env_variables, self._format_python_code,
                    self._imported_names)

    for cls in (ConfigDict, Config):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    return module


@pytest.mark.parametrize("addict_era", [True, False])
def test_files_saved_with_mmengine_configs_load_without_their_code(mmgpt, tmp_path, monkeypatch, addict_era):
    """Multimodal-GPT's training saves its mmengine `Config` (or the inner ConfigDict) beside the tensors: the file is
    read weights-only, those objects as data, and converts as the plain dict does."""
    import sys
    import types

    peer, _, processor, base, finetune, backbones = mmgpt
    module = _mmengine_classes(addict_era)
    with monkeypatch.context() as patch:  # the classes exist while the file is written, as in mmgpt's process
        patch.setitem(sys.modules, "mmengine", types.ModuleType("mmengine"))
        patch.setitem(sys.modules, "mmengine.config", types.ModuleType("mmengine.config"))
        patch.setitem(sys.modules, "mmengine.config.config", module)
        whole = module.Config({"tuning_config": module.ConfigDict(LORA_CONFIG)})
        torch.save({"model_state_dict": finetune["model_state_dict"], "tuning_config": whole}, tmp_path / "a.pt")
        torch.save({"model_state_dict": finetune["model_state_dict"],
                    "tuning_config": module.ConfigDict(LORA_CONFIG)}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        ours, _ = _convert(base, str(tmp_path / name), backbones)
        assert _max_diff(ours, peer, processor) <= 1e-5, name


def test_mmgpt_chat_format(mmgpt):
    """The server's and chat data's `mmgpt` format writes what Multimodal-GPT's demo writes (its PromptGenerator:
    preamble, `### Image:` before the instruction, `### Response:` last) and ends answers with EOS, as mmgpt 0.0.1's
    datasets tokenize them (`instruction + answer`, then EOS). Served answers also end at `### End.`, the end marker
    its first commit trained answers with (docs/serve.md)."""
    _, _, processor, *_ = mmgpt
    fmt = chat_format_for(processor)
    image = "<image>"
    turns = [Turn("user", (image, "What is in the image?"))]
    assert fmt.render(turns) == PROMPTS[0]
    eos = processor.tokenizer.eos_token
    two = [Turn("system", ("Be brief.",)), Turn("user", (image, "What?")), Turn("assistant", ("A cat.",)),
           Turn("user", ("And its colour?",))]
    assert fmt.render(two) == ("Be brief.\n\n### Image:\n<image>\n\n### Instruction:\nWhat?\n\n### Response:\nA cat."
                               + eos + "\n\n### Instruction:\nAnd its colour?\n\n### Response:\n")
    assert fmt.first_reserved("a " + eos) == eos
    assert fmt.segments(two[:3])[-2:] == [("\n\n### Response:\n", False), ("A cat." + eos, True)]
    assert "### End." in fmt.stops and "\n\n### Instruction:" in fmt.stops
    # its training text (mmgpt/datasets/vqa_dataset.py: `TEMPLATE["prompt_qa"]`, the answer, then EOS)
    trained = (MMGPT_PREAMBLE + "\n\n### Image:\n<image>\n\n### Instruction:\nWhat?\n\n### Response:\n"
               + "A cat." + eos)
    assert "".join(text for text, _ in fmt.segments([Turn("user", (image, "What?")),
                                                     Turn("assistant", ("A cat.",))])) == trained


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_convert_command_downloads_the_finetune_and_finds_the_published_base(tmp_path):
    """`flamingo convert mmgpt --lm DIR --finetune URL` in a fresh offline process: the LoRA file is downloaded once
    (torch's hub cache), the base is `openflamingo/OpenFlamingo-9B-deprecated` from a hub-cache stand-in, and the
    saved model (the LM's adapters kept as lm_lora) gives mmgpt's logits."""
    import os
    import subprocess
    import sys

    from flamingo import load_pretrained
    from flamingo.convert.mmgpt import MMGPT_BASE
    from flamingo.convert.openflamingo import CLIP_VIT_L, PUBLISHED_V1

    peer, base, finetune, (vision, lm, tok) = _mmgpt(every=1, seed=5)
    (tmp_path / "of").mkdir()
    torch.save(base, tmp_path / "of" / PUBLISHED_V1[MMGPT_BASE])
    (tmp_path / "web").mkdir()
    torch.save(finetune, tmp_path / "web" / "mmgpt-lora-v0-release.pt")
    vision.save_pretrained(tmp_path / "vision")
    tiny_image_processor("clip").save_pretrained(tmp_path / "vision")
    lm.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    cache = tmp_path / "hf" / "hub"
    for repo, files in ((MMGPT_BASE, "of"), (CLIP_VIT_L, "vision")):
        hub_cache_entry(cache, repo, tmp_path / files)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(tmp_path / "web")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mmgpt-lora-v0-release.pt"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(tmp_path / "torch")}
    argv = ["convert", "mmgpt", "--lm", str(tmp_path / "llama"), "--finetune", url, "--out", str(tmp_path / "out")]
    code = f"from flamingo.cli import main; raise SystemExit(main({argv!r}))"
    try:
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "mmgpt-lora-v0-release.pt").is_file()
    model, processor = load_pretrained(str(tmp_path / "out"))
    assert model.config.lm_lora is not None and model.config.attend_next_image and processor.template == "mmgpt"
    assert model.config.imageless_rows_skip_blocks
    assert "Multimodal-GPT's rule" in (tmp_path / "out" / "README.md").read_text()  # the model card says so
    assert _max_diff(model, peer, processor) <= 1e-5


@pytest.mark.skipif(not __import__("flamingo.runtime.compat", fromlist=["x"]).CONTINUOUS_BATCHING,
                    reason="the server needs transformers >= 5.4")
def test_served_chats_are_its_greedy_answers(mmgpt, one_thread):
    """Two chats at once through the server (OpenAI's client): one with an image, one without; each answer is the
    greedy answer to the prompt Multimodal-GPT's demo writes, the text-only one its LM-alone answer."""
    from concurrent.futures import ThreadPoolExecutor

    from flamingo.chat import BLANKS
    from flamingo.serve.app import ServeSettings
    from flamingo.serve.engine import Engine

    from serve_helpers import data_url, greedy_alone, openai_client, running_server

    peer, ours, processor, *_ = mmgpt
    engine = Engine(ours, processor, max_batch=4)
    chats = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(MEDIA[0][0])}},
                                           {"type": "text", "text": "What is in the image?"}]}],
             [{"role": "user", "content": "Write a haiku."}]]
    with running_server(engine, ServeSettings(model_name="mmgpt")) as url:
        client = openai_client(url)
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda m: client.chat.completions.create(model="mmgpt", messages=m, max_tokens=6,
                                                                          temperature=0), chats))
    eos = processor.tokenizer.eos_token_id
    for out, (prompt, media) in zip(outs, [(PROMPTS[0], MEDIA[0]), (TEXT_ONLY, [])]):
        tokens = greedy_alone(engine, prompt, media or None, 6)
        tokens = tokens[:-1] if tokens and tokens[-1] == eos else tokens
        assert out.choices[0].message.content == processor.decode(tokens).lstrip(BLANKS)  # less the gap, as served
    text = processor(TEXT_ONLY)
    theirs = _peer_text_only(peer, text["input_ids"], text["attention_mask"], 6)[0, text["input_ids"].shape[1]:]
    assert greedy_alone(engine, TEXT_ONLY, None, 6)[:len(theirs)] == theirs.tolist()
