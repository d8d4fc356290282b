"""The seed moons model written out in NumPy: the float64 reference.

Shared by the peer scripts (which import only NumPy and SciPy from here).
Weights come from `bench_peers.py` as an `.npz`: per block k, `w{k}_{j}` and
`b{k}_{j}` for layers j = 0, 1, 2 of `MLPODE([8, 8], 2)`, whose input is
`concat([t, z])` and whose layers compute `h @ w + b` (tanh between).
"""

import numpy as np
from scipy import integrate

BLOCKS = 4
BASE_SCALE = 0.8


def load(path):
  data = np.load(path)
  params = [[(data[f'w{k}_{j}'], data[f'b{k}_{j}']) for j in range(3)]
            for k in range(BLOCKS)]
  return params, data['x']


def field_and_trace(params, t, z):
  """`f(t, z)` and `Tr(df/dz)` of one block, float64, `z` of shape [N, 2]."""
  (w0, b0), (w1, b1), (w2, b2) = [(np.float64(w), np.float64(b))
                                  for w, b in params]
  inp = np.concatenate([np.full((len(z), 1), t), z], 1)
  h0 = np.tanh(inp @ w0 + b0)
  h1 = np.tanh(h0 @ w1 + b1)
  f = h1 @ w2 + b2
  # J = W0[z rows] diag(1 - h0^2) W1 diag(1 - h1^2) W2 (row-vector layout).
  wz = w0[1:]                                         # [2, 8]
  a = np.einsum('ih,nh->nih', wz, 1 - h0 ** 2)       # [N, 2, 8]
  a = np.einsum('nih,hk->nik', a, w1) * (1 - h1 ** 2)[:, None, :]
  jac = np.einsum('nik,kj->nij', a, w2)              # [N, 2(in), 2(out)]
  return f, np.trace(jac, axis1=1, axis2=2)


def reference_log_prob(params, x, rtol=1e-12, atol=1e-12):
  """`log p(x)` by DOP853 (SciPy) on the augmented ODE, block by block from
  the last (the inverse map), float64."""
  z = np.asarray(x, np.float64)
  n = len(z)
  log_det = np.zeros(n)
  for k in reversed(range(BLOCKS)):
    def rhs(t, y, p=params[k]):
      f, tr = field_and_trace(p, t, y[:2 * n].reshape(n, 2))
      return np.concatenate([f.reshape(-1), tr])
    sol = integrate.solve_ivp(rhs, (1., 0.), np.concatenate(
        [z.reshape(-1), np.zeros(n)]), method='DOP853', rtol=rtol, atol=atol)
    z = sol.y[:2 * n, -1].reshape(n, 2)
    log_det += sol.y[2 * n:, -1]
  base = (-0.5 * np.sum((z / BASE_SCALE) ** 2, 1)
          - 2 * np.log(BASE_SCALE) - np.log(2 * np.pi))
  return base + log_det
