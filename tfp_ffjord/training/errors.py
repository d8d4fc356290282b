"""The exceptions of training (no TensorFlow needed to catch them)."""

__all__ = ['TrainingError', 'TrainingInterrupted', 'solver_failure']


class TrainingInterrupted(KeyboardInterrupt):
  """Training stopped by SIGINT (Ctrl-C) after saving a checkpoint."""


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became non-finite).

  Args:
    message: what happened and what was kept.
    solver_error: the `tfp_ffjord.ode.SolverError` behind it when a solve
      failed (its fields say which solver, why, where), else None.
  """

  def __init__(self, message, solver_error=None):
    super().__init__(message)
    self.solver_error = solver_error


def solver_failure(error, where: str, after: str = '.') -> TrainingError:
  """The `TrainingError` for a `tfp_ffjord.ode.SolverError` raised `where`
  (e.g. 'in training step 9'), its summary followed by `after`."""
  return TrainingError(f'The ODE solver failed {where}: '
                       f'{error.summary.rstrip(".")}{after}',
                       solver_error=error)
