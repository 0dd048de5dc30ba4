"""CUDA graphs of the frozen vision tower (`train.vision_cuda_graphs`): a replay gives the tower's own outputs, as
copies that outlive the next replay, for frame counts padded to a bucket; calls it cannot replay run the tower's own
forward; training with it gives the eager loss and gradients. The CUDA tests are skipped without CUDA (CI has none);
run them on a GPU machine with `pytest tests/test_tower_graphs.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from flamingo.train.compile import compile_regions
from flamingo.train.config import load_config
from flamingo.train.tower_graphs import TowerGraphs, install_tower_graphs, remove_tower_graphs, slice_output

from helpers import loss_and_grads, training_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_slice_output_copies_the_first_rows_of_every_tensor():
    hidden = torch.arange(24.0).reshape(4, 3, 2)
    out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden[:, 0],
                                     hidden_states=(hidden, hidden + 1))
    cut = slice_output(out, 3)
    assert isinstance(cut, BaseModelOutputWithPooling)
    assert torch.equal(cut.last_hidden_state, hidden[:3]) and torch.equal(cut.pooler_output, hidden[:3, 0])
    assert [h.shape[0] for h in cut.hidden_states] == [3, 3] and torch.equal(cut.hidden_states[1], hidden[:3] + 1)
    hidden.zero_()  # the graph's buffers are overwritten by the next replay: the copies must not see it
    assert cut.last_hidden_state.abs().sum() > 0 and cut.hidden_states[0].abs().sum() > 0


def test_install_refuses_a_trained_or_cpu_tower_and_cpu_calls_run_the_tower(make_model):
    model, processor = make_model(freeze_vision=False)
    with pytest.raises(ValueError, match="frozen vision tower"):
        install_tower_graphs(model.vision)
    model, processor = make_model()
    with pytest.raises(ValueError, match="CUDA device"):
        install_tower_graphs(model.vision)
    graphs = TowerGraphs(model.vision.forward)  # on the CPU every call is the tower's own
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(graphs(pixel_values=pixels).last_hidden_state,
                           model.vision(pixel_values=pixels).last_hidden_state)
    assert graphs.stats.eager_calls == 1 and graphs.stats.replays == 0 and not graphs.graphs


class _ReplayByRerun:
    """Stands in for a CUDA graph on the CPU: a replay re-runs the recorded call into the recorded output tensors."""

    def __init__(self, run):
        self.run, self.output = run, run()

    def replay(self):
        fresh = self.run()
        self.output.last_hidden_state.copy_(fresh.last_hidden_state)


class CpuTowerGraphs(TowerGraphs):
    """TowerGraphs' bookkeeping (buckets, zero padding, copies out, limits) with the CUDA parts stood in for."""

    @staticmethod
    def _replayable(pixel_values, kwargs):
        return not kwargs and pixel_values is not None and not torch.is_grad_enabled()

    def _record(self, run, device):
        graph = _ReplayByRerun(run)
        return graph, graph.output


def test_replay_bookkeeping_pads_to_buckets_copies_out_and_stops_capturing_at_the_limit(make_model):
    model, _ = make_model()
    graphs = CpuTowerGraphs(model.vision.forward, frames_multiple=4, max_graphs=2)
    torch.manual_seed(0)
    calls = [torch.randn(k, 3, 32, 32) for k in (3, 4, 1, 7, 9, 2)]
    with torch.no_grad():
        got = [graphs(pixel_values=p).last_hidden_state for p in calls]
        want = [model.vision(pixel_values=p).last_hidden_state for p in calls]
    for g, w in zip(got, want):  # each output kept its values through the replays after it
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    stats = graphs.stats
    assert stats.shapes == [(4, 3, 32, 32), (8, 3, 32, 32)]  # 9 frames would need a third graph: past the limit
    assert stats.captured == 2 and stats.replays == 5 and stats.eager_calls == 1
    assert stats.padded_frames == 1 + 0 + 3 + 1 + 2
    entry = graphs.graphs[next(iter(graphs.graphs))]
    assert entry.pixels[2:].abs().sum() == 0  # the last call's 2 frames, then zero padding


def test_config_checks_the_frames_multiple():
    config = load_config("configs/example.yaml", ["train.vision_cuda_graphs=true"])
    assert config.train.vision_cuda_graphs and config.train.vision_graph_frames_multiple == 8
    with pytest.raises(ValueError, match="vision_graph_frames_multiple"):
        load_config("configs/example.yaml", ["train.vision_graph_frames_multiple=0"])


@cuda
@pytest.mark.parametrize("hidden_states", [False, True])
def test_replays_equal_the_tower_over_padded_frame_counts(make_model, no_tf32, hidden_states):
    model, _ = make_model()
    vision = model.vision.cuda()
    own = copy.deepcopy(vision)
    graphs = install_tower_graphs(vision, frames_multiple=8)
    outputs = []
    with torch.no_grad():
        for k in (5, 8, 13, 5):
            pixels = torch.randn(k, 3, 32, 32, device="cuda")
            got = vision(pixel_values=pixels, output_hidden_states=hidden_states)
            want = own(pixel_values=pixels, output_hidden_states=hidden_states)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
            if hidden_states:
                assert len(got.hidden_states) == len(want.hidden_states)
                for g, w in zip(got.hidden_states, want.hidden_states):
                    torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            outputs.append((got.last_hidden_state, want.last_hidden_state))
    for got, want in outputs:  # earlier outputs survive later replays of the same graph
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert graphs.stats.captured == 2 and graphs.stats.shapes == [(8, 3, 32, 32), (16, 3, 32, 32)]
    assert graphs.stats.replays == 4 and graphs.stats.eager_calls == 0 and graphs.stats.padded_frames == 3 + 3 + 3
    pixels = torch.randn(2, 3, 32, 32, device="cuda")
    vision(pixel_values=pixels)  # gradients enabled: the tower's own forward
    assert graphs.stats.eager_calls == 1
    remove_tower_graphs(vision)
    assert "forward" not in vision.__dict__


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_training_with_tower_graphs_equals_eager(make_model, processor_batches, no_tf32, compiled):
    eager, processor = make_model(gates=0.5)
    eager.cuda().train()
    graphed = copy.deepcopy(eager)
    if compiled:
        compile_regions(graphed)
    graphs = install_tower_graphs(graphed.vision, frames_multiple=4)
    for batch in processor_batches(processor):
        loss, grads = loss_and_grads(eager, batch)
        loss_g, grads_g = loss_and_grads(graphed, batch)
        torch.testing.assert_close(loss_g, loss, atol=1e-4, rtol=1e-4)
        assert grads.keys() == grads_g.keys()
        for name in grads:
            torch.testing.assert_close(grads_g[name], grads[name], atol=1e-4, rtol=1e-3, msg=name)
    assert graphs.stats.replays == 2 and graphs.stats.captured == 1  # 3 and 4 frames: one bucket of 4


@pytest.fixture
def processor_batches():
    def make(processor):
        texts = [(["<image>a red square.<|endofchunk|><image>a blue one", "<image>green."], [2, 1]),
                 (["<image>a<|endofchunk|><image>b<|endofchunk|><image>a long caption", "<image>z"], [3, 1])]
        for seed, (prompts, counts) in enumerate(texts):
            yield {k: v.cuda() if isinstance(v, torch.Tensor) and k not in ("num_media", "num_frames") else v
                   for k, v in training_batch(processor, prompts, counts, seed).items()}
    return make


def test_the_no_tf32_fixture_turns_tf32_off_and_its_teardown_runs(no_tf32):
    """The CUDA tests' fixture, on any machine: with pytest's monkeypatch its teardown failed (torch's cuBLAS switch
    cannot be deleted), an error in every CUDA test that used it."""
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
