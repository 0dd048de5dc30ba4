"""One model called from several threads (an app's worker pool, `asyncio.to_thread`): each call's conditioning is
its own thread's, so calls running at once give each its own result, and an LM call outside a Flamingo call (the
bare `model.lm`, the model's one-time LM probes) is the bare LM while another thread is inside a call."""

from __future__ import annotations

import asyncio
import threading

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
