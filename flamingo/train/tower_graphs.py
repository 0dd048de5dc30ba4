"""CUDA graphs for the frozen vision tower (`train.vision_cuda_graphs`): its forward replayed, not re-launched.

A ViT-L/14 tower is ~300 kernel launches per call (24 layers; fewer once `train.compile` fused them), issued by the
host while the GPU waits at small batches. The tower is frozen and runs without autograd, so its whole forward can be
captured once per input shape and replayed: one launch per step.

- Shapes: the frames of a batch that reach the tower (real media only) vary in number; the count is rounded up to a
  multiple of `frames_multiple` with zero frames, which the tower encodes independently of the real ones (a ViT
  mixes nothing across images) and which are cut off again. A run captures one graph per bucket it meets, at most
  `max_graphs`; past that, new shapes run uncaptured (counted in `stats`).
- Outputs: a replay writes into the graph's own output buffers, so each call returns copies (a few MB: K x S x Dv),
  safe to keep across steps (the feature cache does) while the next replay overwrites the buffers.
- Memory: all graphs share one memory pool for their intermediates. That is safe here because replays never overlap
  and each graph's outputs are copied out before any other graph runs; the buffers a graph reads or returns (its
  static input and output) stay allocated for the graph's life.
- Each new shape is run 3 times on a side stream before its capture, so compilation (`train.compile`), autotuning
  and cuBLAS's lazy workspaces happen outside it.
- Frozen weights only: the tower's weights must not change between replays, and the call must be without autograd
  (the model runs a frozen tower under `no_grad`). A call with gradients enabled, on the CPU, with extra keyword
  arguments, or inside another capture runs the tower's own forward. Autocast's weight-cast cache holds only casts of
  leaves that require grad, never the frozen tower's, so no cached cast is baked into a graph.

Installed from outside the model, like `compile.py`: the tower's `forward` becomes an instance attribute (class,
module tree and state-dict keys unchanged); `remove_tower_graphs` puts the tower's own forward back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .buckets import round_up

WARMUP_CALLS = 3


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    pixels: torch.Tensor  # (K_padded, C, H, W): the static input the graph reads
    output: Any  # the tower's output (a ModelOutput) whose tensors the graph writes


@dataclass
class TowerGraphStats:
    replays: int = 0  # calls answered by a replay
    eager_calls: int = 0  # calls run by the tower's own forward (grad on, CPU, extra kwargs, past max_graphs)
    padded_frames: int = 0  # zero frames added to reach a bucket, summed over replays
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # the static input of each graph, in capture order

    @property
    def captured(self) -> int:  # graphs captured (one per input bucket)
        return len(self.shapes)


def slice_output(output: Any, k: int) -> Any:
    """The first `k` rows of every tensor in a tower output (a ModelOutput, tuple or tensor), as fresh copies."""
    if isinstance(output, torch.Tensor):
        return output[:k].clone()
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return tuple(slice_output(v, k) for v in output)
    if hasattr(output, "keys"):  # transformers' ModelOutput: a dataclass that is also an ordered dict
        return type(output)(**{name: slice_output(value, k) for name, value in output.items()})
    return output


class TowerGraphs:
    """Callable standing in for a frozen tower's `forward`: replays a CUDA graph per padded input shape."""

    def __init__(self, forward: Callable[..., Any], *, frames_multiple: int = 8, max_graphs: int = 16) -> None:
        if frames_multiple < 1 or max_graphs < 1:
            raise ValueError("frames_multiple and max_graphs must be >= 1")
        self.forward = forward  # the tower's own forward (compiled or not)
        self.frames_multiple = frames_multiple
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[Any, ...], _Captured] = {}
        self.pool: Optional[tuple[int, int]] = None
        self.stats = TowerGraphStats()
        self.replaced_instance_forward = False  # whether the tower's forward was an instance attribute before

    def __call__(self, pixel_values: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                 **kwargs: Any) -> Any:
        entry, padded = None, 0
        if self._replayable(pixel_values, kwargs):
            padded = round_up(pixel_values.shape[0], self.frames_multiple)  # pixel_values (K, C, H, W)
            autocast = torch.is_autocast_enabled("cuda")
            key = (padded, *pixel_values.shape[1:], pixel_values.dtype, pixel_values.device,
                   bool(output_hidden_states), autocast, torch.get_autocast_dtype("cuda") if autocast else None)
            entry = self.graphs.get(key)
            if entry is None and len(self.graphs) < self.max_graphs:
                entry = self._capture(key, pixel_values, padded, output_hidden_states)
        if entry is None:  # not replayable, or a new shape past max_graphs
            self.stats.eager_calls += 1
            return self.forward(pixel_values=pixel_values, output_hidden_states=output_hidden_states, **kwargs)
        k = pixel_values.shape[0]
        entry.pixels[:k].copy_(pixel_values)
        if padded > k:
            entry.pixels[k:].zero_()
        entry.graph.replay()
        self.stats.replays += 1
        self.stats.padded_frames += padded - k
        return slice_output(entry.output, k)

    @staticmethod
    def _replayable(pixel_values: Optional[torch.Tensor], kwargs: dict[str, Any]) -> bool:
        return not (kwargs or pixel_values is None or not pixel_values.is_cuda or torch.is_grad_enabled()
                    or torch.cuda.is_current_stream_capturing())

    def _capture(self, key: tuple[Any, ...], like: torch.Tensor, padded: int,
                 output_hidden_states: Optional[bool]) -> _Captured:
        pixels = torch.zeros((padded, *like.shape[1:]), dtype=like.dtype, device=like.device)  # (K_padded, C, H, W)

        def run() -> Any:
            return self.forward(pixel_values=pixels, output_hidden_states=output_hidden_states)

        graph, output = self._record(run, like.device)
        entry = _Captured(graph, pixels, output)
        self.graphs[key] = entry
        self.stats.shapes.append(tuple(pixels.shape))
        return entry

    def _record(self, run: Callable[[], Any], device: torch.device) -> tuple[Any, Any]:
        """Warm `run` up on a side stream, then capture it into a CUDA graph (in the shared pool): (graph, output)."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:  # thread_local: another thread's CUDA calls (a pin-memory thread) do not break this capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = run()
        except Exception as e:
            raise RuntimeError(f"capturing the vision tower's forward into a CUDA graph failed ({type(e).__name__}: "
                               f"{e}); set train.vision_cuda_graphs: false") from e
        if self.pool is None:
            self.pool = graph.pool()
        return graph, output


def install_tower_graphs(vision: nn.Module, *, frames_multiple: int = 8, max_graphs: int = 16) -> TowerGraphs:
    """Replace the frozen tower's `forward` by CUDA-graph replays (instance attribute); returns the replayer."""
    if any(p.requires_grad for p in vision.parameters()):
        raise ValueError("vision CUDA graphs need a frozen vision tower (model.flamingo.freeze_vision: true): a "
                         "trained tower's weights change every step and it runs with autograd")
    if not all(p.is_cuda for p in vision.parameters()):
        raise ValueError("vision CUDA graphs need the vision tower on a CUDA device (train.device cuda)")
    if isinstance(vision.forward, TowerGraphs):
        return vision.forward
    graphs = TowerGraphs(vision.forward, frames_multiple=frames_multiple, max_graphs=max_graphs)
    graphs.replaced_instance_forward = "forward" in vision.__dict__  # e.g. a compiled forward set from outside
    vision.forward = graphs
    return graphs


def remove_tower_graphs(vision: nn.Module) -> None:
    """Give the tower its own forward back (its graphs and their memory are freed with the replayer)."""
    graphs = vision.__dict__.get("forward")
    if isinstance(graphs, TowerGraphs):
        del vision.forward  # the class's forward again
        if graphs.replaced_instance_forward:
            vision.forward = graphs.forward
