"""The PyTorch peer for benchmarks/moe.py: torch._grouped_mm alone and in a whole MoE layer.

The layer does what ours does (float32 softmax router, top-k, renormalise, sort by expert, three grouped matmuls,
unsort, weighted combine, sigmoid-gated shared expert), with torch._grouped_mm for the experts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def to_torch(x, dtype=torch.bfloat16, requires_grad: bool = False) -> torch.Tensor:
  """A JAX (or numpy) array on this process's device, shared through DLPack, as a torch tensor of `dtype`."""
  tensor = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.from_dlpack(x)
  return tensor.to(device(), dtype).detach().clone().requires_grad_(requires_grad)


def expert_weights(w, requires_grad: bool = False) -> torch.Tensor:
  """[G, K, N] as torch._grouped_mm wants its second operand: [G, K, N] with the K dim contiguous."""
  stored = to_torch(w).transpose(1, 2).contiguous()  # [G, N, K] in memory
  return stored.transpose(1, 2).detach().requires_grad_(requires_grad)


def grouped_mm(lhs: torch.Tensor, rhs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
  offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
  return torch._grouped_mm(lhs, rhs, offs=offsets)


def time_ms(fn, repeats: int = 5, min_ms: float = 200.0) -> float:
  """Median over `repeats` of the mean ms per call of back-to-back calls filling min_ms (after a warm-up)."""
  import statistics
  import time

  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  fn()
  sync()
  start = time.perf_counter()
  fn()
  sync()
  iters = max(1, int(min_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      fn()
    sync()
    samples.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(samples)


class TorchMoe:
  """Our SparseMoe's computation in torch, weights taken from our parameter tree (JAX or numpy arrays)."""

  def __init__(self, params: dict, top_k: int, requires_grad: bool = False):
    self.top_k = top_k
    self.router = to_torch(params["gate"]["kernel"], requires_grad=requires_grad)
    experts = params["experts"]
    self.gate, self.up, self.down = (expert_weights(experts[n], requires_grad)
                                     for n in ("gate_proj", "up_proj", "down_proj"))
    shared = params["shared_expert"]
    self.shared = [to_torch(shared[n]["kernel"], requires_grad=requires_grad)
                   for n in ("gate_proj", "up_proj", "down_proj")]
    self.shared_gate = to_torch(params["shared_expert_gate"]["kernel"], requires_grad=requires_grad)

  def parameters(self) -> list[torch.Tensor]:
    return [self.router, self.gate, self.up, self.down, *self.shared, self.shared_gate]

  def __call__(self, x: torch.Tensor) -> torch.Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax((tokens @ self.router).float(), dim=-1)
    top_probs, top_experts = torch.topk(probs, self.top_k, dim=-1)
    top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    flat = top_experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=self.gate.shape[0])
    rows = tokens[order // self.top_k]
    hidden = F.silu(grouped_mm(rows, self.gate, sizes)) * grouped_mm(rows, self.up, sizes)
    out_sorted = grouped_mm(hidden, self.down, sizes)
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    routed = (out.reshape(-1, self.top_k, out.shape[-1]).float() * top_probs[..., None]).sum(1).to(x.dtype)
    g, u, d = self.shared
    shared = (F.silu(tokens @ g) * (tokens @ u)) @ d
    return (routed + torch.sigmoid(tokens @ self.shared_gate) * shared).reshape(x.shape)
