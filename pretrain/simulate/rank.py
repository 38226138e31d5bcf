"""One simulated rank: the run's backend built through `build_backend` on fake tensors, then real training steps.

Runs in a process of its own (see `child.py`): it joins a fake process group and patches torch for the duration.
The first step starts from a fresh backend (the optimizer state appears in it), the second is a steady-state
step; the reported peak is the larger of the two. Further steps at other micro-batch sizes find the largest that
fits a memory budget. Each step runs at most two micro-batches: the first accumulates without gradient sync, the
last syncs, and any micro-batch in between repeats the first's memory pattern.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from typing import Iterator

import torch

from ember.errors import UserError
from ember.pretrain.simulate import torch_internals

log = logging.getLogger("ember.pretrain.simulate")

TARGETS = ("gpu", "cpu")
SIMULATED_BACKENDS = ("fsdp",)


def simulated_config(cfg, target: str):
    """`cfg` as a run on `target` builds it: precision and CPU GEMM decided as a run decides them (before any
    process group: no peers to hear from), compile off (compiled kernels hold what eager ones do, and compiling
    fake tensors would take minutes)."""
    from ember.pretrain.kernels import decide_kernels

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})})
    return decide_kernels(cfg.train, torch.device("cuda" if target == "gpu" else "cpu")).apply(cfg)


def check_at_scale(cfg, world_size: int) -> int:
    """The configuration errors that only show at `world_size` ranks; returns the micro-batches per rank and step."""
    t = cfg.train
    if t.seq_len > cfg.model.max_seq_len:
        raise UserError(f"train.seq_len {t.seq_len} exceeds the model's context model.max_seq_len {cfg.model.max_seq_len}",
                        "train.seq_len")
    return t.accumulation_steps(world_size)  # a UserError naming the batch fields when it does not split


@contextlib.contextmanager
def simulated_build(target: str) -> Iterator[None]:
    """What the real build does differently for a simulated rank of `target`:

    - the initial weights are not loaded: rank 0 would scatter them to its peers, and there are no peers nor values
      (the shards' bytes are the same either way);
    - on a GPU target FSDP2 takes the GPU precision policy (bf16 compute copies, fp32 reduction and masters), which
      the real build picks from the device it runs on.
    """
    from ember.pretrain.backends import fsdp

    saved = fsdp.load_initial_weights, fsdp.fsdp_policies
    fsdp.load_initial_weights = lambda *args, **kwargs: None
    if target == "gpu":
        fsdp.fsdp_policies = lambda cfg, device: saved[1](cfg, torch.device("cuda"))
    try:
        yield
    finally:
        fsdp.load_initial_weights, fsdp.fsdp_policies = saved


def _categories(before_update: dict, after: dict, peak: dict) -> dict[str, int]:
    return {
        "weights": after.get("sharded_param", 0),
        "grads": before_update.get("sharded_grad", 0),
        "optimizer": after.get("opt", 0),
        "buffers": after.get("buffer", 0),
        # transient full-size copies and the collectives' buffers, at the peak
        "gathered": sum(peak.get(k, 0) for k in ("unsharded_param", "unsharded_grad", "all_gather", "reduce_scatter")),
        "activations": sum(peak.get(k, 0) for k in ("act", "temp", "inp")),
        "peak": peak.get("total", 0),
    }


class SimulatedRank:
    """The built backend of rank `rank` of `world_size`; `step(micro_batch_size)` runs one measured training step."""

    def __init__(self, cfg, world_size: int, rank: int, target: str):
        from ember.pretrain.backends import build_backend
        from ember.pretrain.optim import build_optimizer

        self.cfg = simulated_config(cfg, target)
        self.num_micro = check_at_scale(self.cfg, world_size)
        mesh = torch_internals.init_fake_process_group(rank, world_size)
        self._fake = contextlib.ExitStack()
        self._fake.enter_context(simulated_build(target))
        self._fake.enter_context(torch_internals.fake_tensors(mesh))
        train = self.cfg.train
        try:
            self.backend = build_backend(self.cfg, lambda model: build_optimizer(model, train))
        except UserError:
            raise
        except (RuntimeError, ValueError, AssertionError) as e:
            raise UserError(f"the model does not build on rank {rank} of {world_size}: {e}", "model") from None

    def close(self) -> None:
        self._fake.close()

    def step(self, micro_batch_size: int) -> dict[str, int]:
        from ember.pretrain.step import CausalLMLoss, lm_batch, train_step

        train, backend = self.cfg.train, self.backend
        rows = micro_batch_size * min(self.num_micro, 2)
        tokens = torch.randint(0, self.cfg.model.vocab_size, (rows, train.seq_len + 1))  # (rows, seq + 1)
        tracker = torch_internals.fsdp_memory_tracker(backend.model, backend.optimizer)
        tracker.track_inputs((tokens,))
        with tracker:
            # The tracker follows one forward per step; each micro-batch's forward starts its module stats afresh
            # (the peak is kept). Prepended after the tracker's own hook, so it runs first.
            reset = backend.model.register_forward_pre_hook(lambda *_: tracker.reset_mod_stats(), prepend=True)
            train_step(backend, lm_batch(tokens), micro_batch_size=micro_batch_size, grad_clip=train.grad_clip,
                       loss=CausalLMLoss(train.z_loss))
            reset.remove()
            before_update = torch_internals.snapshot(tracker)
            backend.step()
        return _categories(before_update, torch_internals.snapshot(tracker), torch_internals.snapshot(tracker, "peak"))


def largest_fitting(peak_at, budget: int, start: int, start_peak: int, slope: float) -> tuple[int, list[tuple[int, int]]]:
    """The largest micro-batch whose simulated peak fits `budget` bytes (0: not even one), by bisection.

    `peak_at(m)` simulates a step at micro-batch m. Activations grow linearly with the micro-batch and the rest does
    not, so the line through the peak at `start` with `slope` (activation bytes per sequence there) guesses the
    answer; the guess and its neighbour across the predicted edge are simulated first, which leaves a bracket of
    one when the line holds: a search takes a few steps, and every answer is a simulated one. Returns it and the
    probes (micro-batch, peak bytes).
    """
    probes = {start: start_peak}

    def fits(m: int) -> bool:
        if m not in probes:
            probes[m] = peak_at(m)
        return probes[m] <= budget

    lo, hi = (start, None) if fits(start) else (0, start)  # lo fits (0 trivially), hi does not
    base, base_peak = start, start_peak
    for _ in range(2):  # the line, then the secant through the first line's probes
        if slope <= 0 or (hi is not None and hi - lo <= 1):
            break
        guess = max(base + int((budget - base_peak) // slope), 1)
        for m in (guess, guess + 1 if guess <= lo or fits(guess) else guess - 1):
            if lo < m and (hi is None or m < hi):
                if fits(m):
                    lo = m
                else:
                    hi = m
        far = max(probes, key=lambda m: abs(m - start))
        if far == start:
            break
        slope = (probes[far] - start_peak) / (far - start)
        base, base_peak = far, probes[far]
    while hi is None:  # the line was too pessimistic: grow until a size does not fit
        if fits(2 * max(lo, 1)):
            lo = 2 * max(lo, 1)
        else:
            hi = 2 * max(lo, 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, sorted(probes.items())


def simulate_rank(cfg, world_size: int, rank: int, target: str, gpu_mem: int | None = None) -> dict:
    """The per-rank memory of one simulated training step (and the largest micro-batch fitting `gpu_mem` bytes)."""
    if cfg.train.backend not in SIMULATED_BACKENDS:
        raise UserError(f"the simulation runs the fsdp backend only; {cfg.train.backend} comes from the formulas",
                        "train.backend")
    if not torch.__version__.startswith(torch_internals.CHECKED_TORCH):
        log.warning("the simulation's torch internals were checked with torch %s; this is %s",
                    torch_internals.CHECKED_TORCH, torch.__version__)
    started = time.perf_counter()
    sim = SimulatedRank(cfg, world_size, rank, target)
    micro = cfg.train.micro_batch_size
    try:
        first = sim.step(micro)
        steady = sim.step(micro)
        result = {**first, **{k: max(first[k], steady[k]) for k in ("gathered", "activations", "peak")}}
        largest = probes = None
        if gpu_mem:
            largest, probes = largest_fitting(lambda m: sim.step(m)["peak"], gpu_mem, micro, result["peak"],
                                              slope=result["activations"] / micro)
    finally:
        sim.close()
    return {"backend": "fsdp", "world_size": world_size, "rank": rank, "target": target, "bytes": result,
            "first_step_peak": first["peak"], "largest_micro_batch": largest,
            "probes": [list(p) for p in probes] if probes else [], "num_micro_batches": sim.num_micro,
            "wall_s": time.perf_counter() - started,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
