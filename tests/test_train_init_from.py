"""`model.init_from` a checkpoint stored in bf16 (IDEFICS's dtype): the run trains float32 master weights with
float32 AdamW states, as from a model saved here, and `train.frozen_dtype` alone decides the frozen backbones'."""

import pytest
import torch
from test_idefics_equal import _peer  # noqa: E402

from flamingo.tiny import tiny_flamingo
from flamingo.train.config import load_config, parse_config
from flamingo.train.trainer import Trainer, build_model

from helpers import chat_run_config, hub_cache_entry  # noqa: E402


@pytest.fixture(scope="module")
def idefics_bf16_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics_bf16")
    peer, tok = _peer("vector", True)
    peer.to(torch.bfloat16).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _optimizer_dtypes(trainer: Trainer) -> set[torch.dtype]:
    return {
        v.dtype
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.is_floating_point() and v.ndim
    }


def test_a_bf16_checkpoint_trains_float32_master_weights(idefics_bf16_dir, tmp_path):
    """precision fp32 (the default): every parameter float32, and one step at a fine-tuning lr moves nearly every
    trained value (in bf16, most such updates round away)."""
    path = chat_run_config(tmp_path, str(idefics_bf16_dir), steps=1)
    trainer = Trainer(load_config(str(path), ["optim.lr=1e-5", "train.progress=false"]))
    assert {p.dtype for p in trainer.trained} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # frozen_dtype null: float32 too
    before = [p.detach().clone() for p in trainer.trained]
    trainer.train_step()
    assert _optimizer_dtypes(trainer) == {torch.float32}
    changed = sum(int((p != b).sum()) for p, b in zip(trainer.trained, before))
    assert changed / sum(b.numel() for b in before) > 0.95


def test_frozen_dtype_bf16_halves_only_the_frozen_parts(idefics_bf16_dir, tmp_path):
    """train.frozen_dtype: bf16 stores the frozen backbones in bf16; the trained blocks stay float32 (with their
    states), and the LM's rotary frequencies keep float32, as for a model saved here."""
    path = chat_run_config(tmp_path, str(idefics_bf16_dir), steps=1)
    trainer = Trainer(
        load_config(
            str(path), ["optim.lr=1e-5", "train.progress=false", "train.precision=bf16", "train.frozen_dtype=bf16"]
        )
    )
    model = trainer.model
    assert {p.dtype for p in trainer.trained} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {b.dtype for n, b in model.lm.named_buffers() if "inv_freq" in n} == {torch.float32}
    trainer.train_step()
    assert _optimizer_dtypes(trainer) == {torch.float32}


def _config(init_from: str, revision: str | None) -> dict:
    return {
        "model": {"init_from": init_from, "init_from_revision": revision},
        "data": [{"name": "a", "kind": "pairs", "path": "x"}],
    }


def test_init_from_is_read_at_model_init_from_revision(tmp_path, monkeypatch):
    """model.init_from_revision is the Hub branch, tag or commit init_from is read at, as `--revision` is for
    --model: the offline cache holds the repository at `v2` alone, so a read of its default branch fails. A local
    directory has no revisions: the field is refused by name, as it is without init_from."""
    import huggingface_hub
    import huggingface_hub.constants

    saved, processor = tiny_flamingo(gates=0.25)
    saved.save_pretrained(str(tmp_path / "saved"), processor=processor)
    cache = tmp_path / "hub"
    hub_cache_entry(cache, "someone/tiny-flamingo", tmp_path / "saved", revision="v2", commit="c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    asked = []
    real = huggingface_hub.snapshot_download

    def recorded(repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("revision")))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorded)
    model, _ = build_model(parse_config(_config("someone/tiny-flamingo", "v2")))
    assert asked and set(asked) == {("someone/tiny-flamingo", "v2")}
    gates = [n for n, _ in saved.named_parameters() if "gate" in n]
    state = dict(model.named_parameters())
    assert gates and all(torch.equal(state[n], p) for n, p in saved.named_parameters() if n in gates)

    with pytest.raises(
        ValueError,
        match=r"model.init_from_revision='v2' names a version of a Hub repository, and "
        r"model.init_from .* is a local directory, which has no revisions",
    ):
        parse_config(_config(str(tmp_path / "saved"), "v2"))
    with pytest.raises(ValueError, match="model.init_from_revision='v2' is set, but model.init_from is not"):
        parse_config({**_config("x", "v2"), "model": {"init_from_revision": "v2"}})
