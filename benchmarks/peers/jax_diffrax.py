"""The seed moons training step in JAX + diffrax (a peer of bench_peers.py).

Same weights, data, model and exact trace as tfp_ffjord's seed configuration:
4 blocks solved one after another from t = 1 to 0 (the inverse map), loss
`-mean log p(x)` over 256 points, Adam 1e-2, `jax.jit` of the whole step,
gradients by diffrax's default (`RecursiveCheckpointAdjoint`: backprop
through the solve) and, for Tsit5, by `BacksolveAdjoint` (the continuous
adjoint, solved backwards, as tfp_ffjord's `gradient='adjoint'`). Prints
one JSON line per (configuration, tolerance): max
|log p - reference| at the initial weights, first step (trace + compile +
run) and the median steady step.

Run with a Python that has jax and diffrax:
  python benchmarks/peers/jax_diffrax.py WEIGHTS.npz
"""

import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model  # noqa: E402

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

TOLERANCES = [(1e-2, 1e-4), (1e-3, 1e-5), (1e-4, 1e-6), (1e-5, 1e-7)]
STEADY_STEPS = 20


def mlp(p, t, z):
  h = jnp.concatenate([jnp.full(z.shape[:-1] + (1,), t), z], -1)
  h = jnp.tanh(h @ p[0][0] + p[0][1])
  h = jnp.tanh(h @ p[1][0] + p[1][1])
  return h @ p[2][0] + p[2][1]


def augmented(t, y, p):
  z = y[:, :2]
  f = mlp(p, t, z)
  jac = jax.vmap(jax.jacfwd(lambda zi: mlp(p, t, zi)))(z)   # [N, 2, 2]
  return jnp.concatenate([f, jnp.trace(jac, axis1=1, axis2=2)[:, None]], 1)


def make_log_prob(solver, rtol, atol, adjoint=None):
  term = diffrax.ODETerm(augmented)
  controller = diffrax.PIDController(rtol=rtol, atol=atol)
  extra = {} if adjoint is None else dict(adjoint=adjoint)

  def log_prob(params, x):
    z, log_det = x, jnp.zeros(x.shape[0])
    for k in reversed(range(model.BLOCKS)):
      sol = diffrax.diffeqsolve(
          term, solver, t0=1., t1=0., dt0=None,
          y0=jnp.concatenate([z, jnp.zeros((x.shape[0], 1))], 1),
          args=params[k], stepsize_controller=controller, max_steps=4096,
          **extra)
      y = sol.ys[-1]
      z, log_det = y[:, :2], log_det + y[:, 2]
    s = model.BASE_SCALE
    base = (-0.5 * jnp.sum((z / s) ** 2, 1) - 2 * jnp.log(s)
            - jnp.log(2 * jnp.pi))
    return base + log_det
  return log_prob


def adam(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
  def init(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return (zeros, zeros, jnp.zeros([], jnp.int32))

  def update(grads, state, params):
    m, v, n = state
    n = n + 1
    m = jax.tree_util.tree_map(lambda a, g: b1 * a + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda a, g: b2 * a + (1 - b2) * g * g, v,
                               grads)
    c1, c2 = 1 - b1 ** n, 1 - b2 ** n
    params = jax.tree_util.tree_map(
        lambda p, a, b: p - lr * (a / c1) / (jnp.sqrt(b / c2) + eps),
        params, m, v)
    return params, (m, v, n)
  return init, update


def main():
  params_np, x_np = model.load(sys.argv[1])
  reference = model.reference_log_prob(params_np, x_np)
  x = jnp.asarray(x_np, jnp.float32)
  for name, solver, adjoint in (
      ('diffrax Tsit5', diffrax.Tsit5(), None),
      ('diffrax Dopri5', diffrax.Dopri5(), None),
      ('diffrax Tsit5, BacksolveAdjoint', diffrax.Tsit5(),
       diffrax.BacksolveAdjoint())):
    for rtol, atol in TOLERANCES:
      params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                      params_np)
      log_prob = make_log_prob(solver, rtol, atol, adjoint)
      error = float(np.max(np.abs(np.asarray(
          jax.jit(log_prob)(params, x)) - reference)))
      init, update = adam()

      @jax.jit
      def step(params, state, x, log_prob=log_prob, update=update):
        loss, grads = jax.value_and_grad(
            lambda p: -jnp.mean(log_prob(p, x)))(params)
        params, state = update(grads, state, params)
        return loss, params, state

      state = init(params)
      start = time.perf_counter()
      loss, params, state = step(params, state, x)
      loss.block_until_ready()
      first = time.perf_counter() - start
      times = []
      for _ in range(STEADY_STEPS):
        start = time.perf_counter()
        loss, params, state = step(params, state, x)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
      print(json.dumps(dict(
          implementation=name, rtol=rtol, atol=atol, max_error=error,
          first_step_s=first, steady_step_ms=1000 * statistics.median(times),
          version=f'jax {jax.__version__}, diffrax {diffrax.__version__}')),
          flush=True)


if __name__ == '__main__':
  main()
