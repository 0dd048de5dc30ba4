"""One model called from several threads (an app's worker pool, `asyncio.to_thread`): each call's conditioning is
its own thread's, so calls running at once give each its own result, and an LM call outside a Flamingo call (the
bare `model.lm`, the model's one-time LM probes) is the bare LM while another thread is inside a call."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch

from flamingo.tiny import random_image

CASES = [
    ("<image>Question: what is this? Answer:", [random_image(0)]),
    ("<image>An image of<|endofchunk|><image>And this one shows", [random_image(1), random_image(2)]),
    ("Question: no image here? Answer:", []),
    ("<image>Describe it:", [random_image(3)]),
]


def _greedy(model, processor, prompt: str, images: list) -> list[int]:
    batch = processor(prompt, images=images)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def test_generate_from_several_threads_at_once_gives_each_call_its_own_tokens(make_model, one_thread):
    """Calls from four threads at once were refused ("cannot be nested": the context was one attribute of the
    model); each now equals the same call made alone."""
    model, processor = make_model("llama")
    alone = [_greedy(model, processor, *case) for case in CASES]
    start, results, errors = threading.Barrier(len(CASES)), {}, []

    def worker(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = [_greedy(model, processor, *CASES[(i + r) % len(CASES)]) for r in range(3)]
        except BaseException as e:  # the test's to report
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(len(CASES)):
        assert results[i] == [alone[(i + r) % len(CASES)] for r in range(3)], i

    async def at_once() -> list[list[int]]:  # the shape of an async web app's handlers
        return await asyncio.gather(*(asyncio.to_thread(_greedy, model, processor, *case) for case in CASES))

    assert asyncio.run(at_once()) == alone


def test_bare_lm_calls_while_another_thread_is_inside_a_call_are_the_bare_lms(make_model, one_thread):
    """Thread A is held inside its prompt's prefill. Meanwhile another thread's `model.lm(...)` ran under A's images
    (silently other logits), and the one-time probe of left padding read and overwrote A's media index (crashing A,
    or caching a wrong "pads otherwise" that refused every padded batch): both are now the bare LM's, and A's tokens
    are its own."""
    model, processor = make_model("llama")
    prompt, images = CASES[1]
    alone = _greedy(model, processor, prompt, images)
    text = processor("Some plain text to score", images=[])["input_ids"]
    with torch.no_grad():
        bare = model.lm(input_ids=text).logits
    inside, release, answer = threading.Event(), threading.Event(), {}
    layer = model.lm.get_submodule(model.decoder_layers_path)[1]

    def hold(module, args):  # A's first pass through layer 1: inside the call, its context active
        if threading.current_thread().name == "A" and not inside.is_set():
            inside.set()
            assert release.wait(timeout=60)

    handle = layer.register_forward_pre_hook(hold)
    a = threading.Thread(target=lambda: answer.update(tokens=_greedy(model, processor, prompt, images)), name="A")
    a.start()
    try:
        assert inside.wait(timeout=60)
        with torch.no_grad():
            during = model.lm(input_ids=text).logits
        probe = model._lm_pads_exactly()
    finally:
        release.set()
        a.join(timeout=60)
        handle.remove()
    assert torch.equal(during, bare)
    assert probe is True
    assert answer.get("tokens") == alone


def test_checkpointing_in_training_mode_keeps_dropout_off_for_calls_on_two_threads(make_model):
    """The frozen layers' flags are shared by threads: a call that entered while another had switched them off found
    none to switch, and ran its later layers with them on (dropout) once the first call switched them back. A call
    now holds them off until it is done; here thread B starts while A is inside its first layer."""
    model, processor = make_model("opt", gates=0.8, lm_overrides=dict(dropout=0.3))
    batch = processor("<image>Question: what is this? Short answer:", images=[random_image(1)])
    cont = [processor.tokenizer(" a cat", add_special_tokens=False)["input_ids"]]
    model.gradient_checkpointing_enable()
    model.train()
    layers = model.lm.get_submodule(model.decoder_layers_path)
    seen: list[tuple[str, bool]] = []
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        name = threading.current_thread().name
        seen.append((name, module.training))
        if module is layers[0] and name == "A" and not a_inside.is_set():
            a_inside.set()
            b_inside.wait(1.0)  # B, if it is let in, starts now
        elif module is layers[0] and name == "B" and not b_inside.is_set():
            b_inside.set()
            a_done.wait(5.0)  # ... and goes on after A has left

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    scores: dict[str, torch.Tensor] = {}

    def score(name: str) -> None:
        scores[name] = model.score(batch["input_ids"], cont, images=batch["images"])

    a, b = threading.Thread(target=score, args=("A",), name="A"), threading.Thread(target=score, args=("B",), name="B")
    try:
        a.start()
        assert a_inside.wait(30)
        b.start()
        a.join()
        a_done.set()
        b.join()
    finally:
        for handle in handles:
            handle.remove()
    assert {name for name, _ in seen} == {"A", "B"}
    assert [name for name, training in seen if training] == []
    torch.testing.assert_close(scores["A"], scores["B"], atol=0, rtol=0)
    assert layers[0].training  # left as the training forward needs it


def test_a_training_forward_keeps_its_flags_while_another_thread_scores(make_model):
    """A training forward under checkpointing did not hold the frozen layers' flags: a layer HF left unwrapped while
    a scorer on another thread had them off then ran its dropout once the scorer switched them back on. A training
    forward now waits for the scorer, then holds them; here it starts while B is inside its first layer."""
    model, processor = make_model("opt", gates=0.8, lm_overrides=dict(dropout=0.3))
    batch = processor("<image>Question: what is this? Short answer: a cat", images=[random_image(1)])
    cont = [processor.tokenizer(" a cat", add_special_tokens=False)["input_ids"]]
    model.gradient_checkpointing_enable()
    model.train()
    layers = model.lm.get_submodule(model.decoder_layers_path)
    seen: list[bool] = []
    b_inside, a_waiting, b_done = threading.Event(), threading.Event(), threading.Event()

    def hook(layer: torch.nn.Module) -> Any:
        def inside_the_layer(module: torch.nn.Module, args: tuple) -> None:  # within its forward, checkpointed or not
            name = threading.current_thread().name
            if layer is layers[0] and name == "B" and not b_inside.is_set():
                b_inside.set()
                a_waiting.wait(1.0)  # A, if it is let in, enters its first layer now
            elif name == "A":
                if layer is layers[0] and not a_waiting.is_set():
                    a_waiting.set()
                    b_done.wait(5.0)  # ... and computes it after B has left
                seen.append(layer.training)  # what the layer's own dropout reads
        return inside_the_layer

    def score() -> None:
        model.score(batch["input_ids"], cont, images=batch["images"])
        b_done.set()

    handles = [layer.self_attn.register_forward_pre_hook(hook(layer)) for layer in layers]
    a = threading.Thread(target=lambda: model(**batch, labels=batch["input_ids"]).loss.backward(), name="A")
    b = threading.Thread(target=score, name="B")
    try:
        b.start()
        assert b_inside.wait(30)
        a.start()
        b.join()
        a.join()
    finally:
        for handle in handles:
            handle.remove()
    assert seen and not any(seen), seen


def test_eval_on_another_thread_during_a_call_leaves_the_layers_in_eval(make_model):
    """`model.eval()` on another thread while a call had the frozen layers' flags off: the call's end switched them
    back on, and the model, in eval mode, ran OPT's dropout in every later call. `train` / `eval` wait for the call."""
    model, processor = make_model("opt", gates=0.8, lm_overrides=dict(dropout=0.3))
    batch = processor("<image>Question: what is this? Short answer:", images=[random_image(1)])
    cont = [processor.tokenizer(" a cat", add_special_tokens=False)["input_ids"]]
    expected = model.eval().score(batch["input_ids"], cont, images=batch["images"])
    model.gradient_checkpointing_enable()
    model.train()
    layers = model.lm.get_submodule(model.decoder_layers_path)
    inside, evaluated = threading.Event(), threading.Event()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if module is layers[0] and not inside.is_set():
            inside.set()
            evaluated.wait(1.0)  # B's eval(), if it is let through, happens now

    def to_eval() -> None:
        model.eval()
        evaluated.set()

    handle = layers[0].register_forward_pre_hook(hook)
    a = threading.Thread(target=model.score, args=(batch["input_ids"], cont), kwargs={"images": batch["images"]})
    b = threading.Thread(target=to_eval)
    try:
        a.start()
        assert inside.wait(30)
        b.start()
        a.join()
        b.join()
    finally:
        handle.remove()
    assert not model.training and [layer.training for layer in layers] == [False] * len(layers)
    torch.testing.assert_close(model.score(batch["input_ids"], cont, images=batch["images"]), expected,
                               atol=0, rtol=0)


def test_two_threads_first_lm_probes_at_once_leave_the_lms_modes_as_they_were(make_model):
    """A one-time LM probe saves every LM module's mode, puts the LM in eval and restores them: a second thread's
    probe inside the first saved the eval modes and restored them last, leaving a training model's LM in eval mode
    (dropout off, or a frozen LM's checkpointing off) for good. Probes take turns."""
    model, _ = make_model("llama", freeze_lm=False)
    model.train()
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    calls = {"A": 0, "B": 0}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        name = threading.current_thread().name
        calls[name] += 1
        if name == "A" and calls[name] == 1:
            a_in.set()
            b_in.wait(1.0)  # B, if it is let in, starts its probe now
        elif name == "B" and calls[name] == 1:
            b_in.set()
        elif name == "B" and calls[name] == 3:
            a_done.wait(5.0)  # ... and restores after A

    def first() -> None:
        model.pads_exactly()
        a_done.set()

    handle = model.lm.register_forward_pre_hook(hook, with_kwargs=True)
    a = threading.Thread(target=first, name="A")
    b = threading.Thread(target=model.pads_exactly, name="B")
    try:
        a.start()
        assert a_in.wait(30)
        b.start()
        a.join()
        b.join()
    finally:
        handle.remove()
    assert model.lm.training and all(m.training for m in model.lm.modules())


def test_the_heads_probe_counts_its_own_call_only(make_model):
    """`head_is_last_op` hooks the shared output head and expects one output: another thread's call through the head
    during the probe made it two, the probe answered False for good, and the chunked loss was off from then on."""
    model, processor = make_model("llama")
    batch = processor("<image>A photo of a dog", images=[random_image(0)])
    inside, generated = threading.Event(), threading.Event()

    def hold(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.current_thread().name == "A" and not inside.is_set():
            inside.set()
            generated.wait(5.0)  # another thread's generate runs the head now

    result: dict[str, bool] = {}
    handle = model.lm.register_forward_pre_hook(hold, with_kwargs=True)
    a = threading.Thread(target=lambda: result.update(probe=model.head_is_last_op()), name="A")
    try:
        a.start()
        assert inside.wait(30)
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
        generated.set()
        a.join()
    finally:
        handle.remove()
    assert result["probe"] is True
