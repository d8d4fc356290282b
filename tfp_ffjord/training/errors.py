"""The exceptions of training (no TensorFlow needed to catch them)."""

__all__ = ['TrainingError', 'TrainingInterrupted']


class TrainingInterrupted(KeyboardInterrupt):
  """Training stopped by SIGINT (Ctrl-C) after saving a checkpoint."""


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became non-finite).

  `solver_error` is the `tfp_ffjord.ode.SolverError` behind it when a solve
  failed (its fields say which solver, why, where), else None.
  """

  def __init__(self, message, solver_error=None):
    super().__init__(message)
    self.solver_error = solver_error
