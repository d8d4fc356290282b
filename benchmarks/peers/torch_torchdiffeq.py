"""The seed moons training step in PyTorch + torchdiffeq (a peer of
bench_peers.py).

Same weights, data, model and exact trace as tfp_ffjord's seed configuration
(see jax_diffrax.py), eager PyTorch, `torchdiffeq.odeint` with dopri5 and
backprop through the solve, `torch.optim.Adam(1e-2)`. Prints one JSON line
per tolerance, like jax_diffrax.py.

Run with a Python that has torch and torchdiffeq:
  python benchmarks/peers/torch_torchdiffeq.py WEIGHTS.npz
"""

import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model  # noqa: E402

import torch  # noqa: E402
import torchdiffeq  # noqa: E402

TOLERANCES = [(1e-2, 1e-4), (1e-3, 1e-5), (1e-4, 1e-6), (1e-5, 1e-7)]
STEADY_STEPS = 10


class Block(torch.nn.Module):

  def __init__(self, params):
    super().__init__()
    self.layers = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.tensor(a, dtype=torch.float32))
         for w, b in params for a in (w, b)])

  def field(self, t, z):
    w0, b0, w1, b1, w2, b2 = self.layers
    h = torch.cat([t.expand(z.shape[0], 1), z], 1)
    h = torch.tanh(h @ w0 + b0)
    h = torch.tanh(h @ w1 + b1)
    return h @ w2 + b2

  def forward(self, t, y):
    with torch.enable_grad():
      z = y[:, :2]
      if not z.requires_grad:
        z = z.requires_grad_(True)
      f = self.field(t, z)
      trace = sum(torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][
          :, i] for i in range(2))
    return torch.cat([f, trace[:, None]], 1)


def log_prob(blocks, x, rtol, atol):
  z, log_det = x, torch.zeros(x.shape[0])
  times = torch.tensor([1., 0.])
  for block in reversed(blocks):
    y = torchdiffeq.odeint(block, torch.cat([z, torch.zeros(len(x), 1)], 1),
                           times, rtol=rtol, atol=atol, method='dopri5')[-1]
    z, log_det = y[:, :2], log_det + y[:, 2]
  s = model.BASE_SCALE
  base = (-0.5 * torch.sum((z / s) ** 2, 1) - 2 * np.log(s)
          - np.log(2 * np.pi))
  return base + log_det


def main():
  torch.set_num_threads(2)
  params_np, x_np = model.load(sys.argv[1])
  reference = model.reference_log_prob(params_np, x_np)
  x = torch.tensor(x_np, dtype=torch.float32)
  for rtol, atol in TOLERANCES:
    blocks = torch.nn.ModuleList([Block(p) for p in params_np])
    error = float(np.max(np.abs(
        log_prob(blocks, x, rtol, atol).detach().numpy() - reference)))
    optimizer = torch.optim.Adam(blocks.parameters(), lr=1e-2)

    def step():
      optimizer.zero_grad()
      loss = -log_prob(blocks, x, rtol, atol).mean()
      loss.backward()
      optimizer.step()
      return float(loss)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(STEADY_STEPS):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    print(json.dumps(dict(
        implementation='torchdiffeq dopri5 (eager)', rtol=rtol, atol=atol,
        max_error=error, first_step_s=first,
        steady_step_ms=1000 * statistics.median(times),
        version=f'torch {torch.__version__}, torchdiffeq '
        f'{torchdiffeq.__version__}')), flush=True)


if __name__ == '__main__':
  main()
