"""The job behind `tfp-ffjord vi`: one surrogate fitted to one target,
measured, and written to a run directory."""

import dataclasses
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfp_ffjord.training.model import solver_named
from tfp_ffjord.vi.fitting import _flat_draws  # pylint: disable=protected-access
from tfp_ffjord.vi.fitting import _flat_truth  # pylint: disable=protected-access
from tfp_ffjord.vi.fitting import evaluate
from tfp_ffjord.vi.fitting import fit
from tfp_ffjord.vi import staged as staged_lib
from tfp_ffjord.vi.surrogates import build_surrogate
from tfp_ffjord.vi.surrogates import load_target
from tfp_ffjord.vi.surrogates import target_log_prob_fn

@dataclasses.dataclass
class VIConfig:
  """One `tfp-ffjord vi` job.

  Attributes:
    target: a name of `registry.VI_TARGETS`.
    surrogate: a name of `registry.VI_SURROGATES`.
    num_steps: `fit`'s optimizer steps.
    max_seconds: also stop `fit` after this much wall time (None: no limit).
    learning_rate: Adam's learning rate.
    sample_size: draws per ELBO estimate.
    seed: the job's seed.
    blocks: the FFJORD surrogate's blocks.
    hidden: their dynamics' hidden sizes.
    solver: a name of `registry.SOLVERS` (backprop gradients).
    rtol: an adaptive solver's relative tolerance.
    atol: its absolute tolerance.
    num_solver_steps: a fixed-step solver's steps.
    trace: 'exact', 'hutchinson', or None (exact up to
      `EXACT_TRACE_MAX_DIM` unconstrained dimensions).
    estimator: 'reparameterization' or 'stl' (sticking the landing).
    num_eval_samples: the draws of `evaluate`.
    fine_tune_learning_rate: with a value, every surrogate trains in two
      phases (`fit_staged`): a quarter of the budget at `learning_rate` (a
      staged surrogate: its base alone), then the rest with a fresh Adam at
      this rate. None: a staged surrogate's second phase runs at
      `learning_rate / 10` (`fit_staged`'s default); the other surrogates
      train in one phase.
  """
  target: str = 'banana'
  surrogate: str = 'ffjord'
  num_steps: int = 2000
  max_seconds: Optional[float] = None
  learning_rate: float = 1e-2
  sample_size: int = 64
  seed: int = 0
  blocks: int = 2
  hidden: Sequence[int] = (32, 32)
  solver: str = 'dopri5'
  rtol: float = 1e-3
  atol: float = 1e-6
  num_solver_steps: int = 8
  trace: Optional[str] = None
  estimator: str = 'reparameterization'
  num_eval_samples: int = 4096
  fine_tune_learning_rate: Optional[float] = None


def run(config: Optional[VIConfig] = None, out_dir: Optional[str] = None, *,
        verbose: bool = False, **settings) -> dict:
  """Fits one surrogate to one registered target and measures it.

  The job behind `tfp-ffjord vi`: `load_target`, `build_surrogate`, `fit`,
  `evaluate`; with `out_dir`, writes `metrics.json`, `elbo.png` and
  `posterior.png` (surrogate and exact samples for a 2-D target with a
  sampler; per-coordinate means and standard deviations against the ground
  truth otherwise, and `pairs.png`: the most dependent coordinate pairs
  over exact samples or the ground truth's moments).

  Args:
    config: a `VIConfig` (default `VIConfig()`).
    out_dir: the directory to write into, or None.
    verbose: print progress.
    **settings: fields overriding `config`'s, e.g.
      `run(target='funnel', num_steps=500)`.

  Returns:
    The metrics (`evaluate`'s, the fit's steps and times, the settings).
  """
  c = dataclasses.replace(config or VIConfig(), **settings)
  tf.random.set_seed(c.seed)
  model = load_target(c.target)
  ffjord_kwargs = {}
  if c.surrogate == 'ffjord' or c.surrogate.startswith('staged-ffjord'):
    ffjord_kwargs = dict(blocks=c.blocks, trace=c.trace,
                         ode_solve_fn=solver_named(
                             c.solver, rtol=c.rtol, atol=c.atol,
                             num_steps=c.num_solver_steps,
                             gradient='backprop').solve)

  def build():
    return build_surrogate(c.surrogate, model, hidden=c.hidden, seed=c.seed,
                           **ffjord_kwargs)
  q = build()
  stopped = build() if c.estimator == 'stl' else None
  staged = isinstance(q, staged_lib.StagedSurrogate)   # base, then FFJORD
  # ASVI's graph (a distribution per part of the model) compiles for
  # minutes under XLA: 121 s against 19.5 s for the first step on
  # brownian-motion. It runs without XLA.
  kwargs = dict(learning_rate=c.learning_rate, sample_size=c.sample_size,
                seed=c.seed, estimator=c.estimator, max_seconds=c.max_seconds,
                jit_compile=c.surrogate != 'asvi')
  if staged or c.fine_tune_learning_rate is not None:
    if not staged:   # two phases of the same surrogate
      q = staged_lib.StagedSurrogate(q, q)
      if stopped is not None:
        stopped = staged_lib.StagedSurrogate(stopped, stopped)
    result = staged_lib.fit_staged(
        q, target_log_prob_fn(model), c.num_steps, stopped_surrogate=stopped,
        fine_tune_learning_rate=c.fine_tune_learning_rate, **kwargs)
    q = q.full
  else:
    result = fit(q, target_log_prob_fn(model), c.num_steps,
                 stopped_surrogate=stopped, **kwargs)
  if verbose:
    print(f'{c.target} / {c.surrogate}: {result.steps} steps in '
          f'{result.seconds[-1]:.1f} s (first {result.first_step_seconds:.1f}'
          ' s)', flush=True)
  measured = evaluate(q, model, num_samples=c.num_eval_samples,
                      seed=c.seed + 1)
  tail = result.losses[-max(1, result.steps // 10):]
  config_record = {k: v for k, v in dataclasses.asdict(c).items()
                   if k not in ('target', 'surrogate', 'estimator',
                                'num_eval_samples')}
  config_record['hidden'] = list(c.hidden)
  metrics = dict(
      target=c.target, surrogate=c.surrogate, estimator=c.estimator,
      steps=int(result.steps), wall_seconds=float(result.seconds[-1]),
      first_step_seconds=float(result.first_step_seconds),
      final_train_elbo=float(-np.mean(tail)),
      num_parameters=int(sum(np.prod(v.shape) for v in q.trainable_variables)),
      laplace=None if result.laplace is None else result.laplace._asdict(),
      stage_elbos=result.stage_elbos,
      config=config_record, **measured)
  if out_dir is not None:
    _write_outputs(out_dir, metrics, result, q, model)
  return metrics


def _write_outputs(out_dir, metrics, result, q, model):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from tfp_ffjord import plotting  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  title = f'{metrics["target"]}: {metrics["surrogate"]} surrogate'
  plotting.plot_elbo(os.path.join(out_dir, 'elbo.png'),
                     {metrics['surrogate']: -result.losses}, title=title)
  samples = q.sample(2000, seed=(metrics['config']['seed'], 99))
  transform = model.sample_transformations['identity']
  flat = _flat_draws(transform(samples)).astype(np.float64)
  path = os.path.join(out_dir, 'posterior.png')
  if flat.shape[1] == 2 and hasattr(model, 'sample'):
    reference = _flat_draws(model.sample(2000, seed=(0, 1)))
    plotting.plot_posterior_2d(path, flat, reference, title=title)
  else:
    truth_mean = transform.ground_truth_mean
    truth_std = transform.ground_truth_standard_deviation
    truth_mean = None if truth_mean is None else _flat_truth(truth_mean)
    truth_std = None if truth_std is None else _flat_truth(truth_std)
    plotting.plot_marginals(path, flat.mean(0), flat.std(0), truth_mean,
                            truth_std, title=title)
    # The most dependent pairs, over exact samples where the target draws
    # them (the funnel's neck), else over the ground truth's moments.
    reference = (_flat_draws(transform(model.sample(2000, seed=(0, 1))))
                 if hasattr(model, 'sample') else None)
    plotting.plot_pairs(os.path.join(out_dir, 'pairs.png'), flat, reference,
                        truth_mean, truth_std, title=title)
  tmp = os.path.join(out_dir, 'metrics.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(dict(metrics, neg_elbo_per_step=[float(v) for v in
                                               result.losses]), f, indent=1)
  os.replace(tmp, os.path.join(out_dir, 'metrics.json'))
