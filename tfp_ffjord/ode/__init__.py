"""ODE solvers for continuous normalizing flows, compatible with `tfp.math.ode`.

Fixed step: `Euler`, `Midpoint`, `RK4`. Adaptive: `DormandPrince`, `Tsit5`.
All compile under XLA, run in TF1 graphs, take complex states and offer
`gradient='adjoint'` or `'backprop'` (or the objects `Adjoint(make_solver_fn)`
and `Backprop()`). A solver's `controller` is its step-size controller,
`ConstantStepSize` or `PIController`.
"""

from tfp_ffjord.ode.base import Diagnostics
from tfp_ffjord.ode.base import Results
from tfp_ffjord.ode.base import SolverError
from tfp_ffjord.ode.base import Status
from tfp_ffjord.ode.base import XLA_BACKPROP_MAX_NUM_STEPS
from tfp_ffjord.ode.base import status_message
from tfp_ffjord.ode.checked import checked_function
from tfp_ffjord.ode.checked import checked_while_loop
from tfp_ffjord.ode.controllers import ConstantStepSize
from tfp_ffjord.ode.controllers import PIController
from tfp_ffjord.ode.gradients import Adjoint
from tfp_ffjord.ode.gradients import Backprop
from tfp_ffjord.ode.solvers import AdaptiveSolver
from tfp_ffjord.ode.solvers import DormandPrince
from tfp_ffjord.ode.solvers import Euler
from tfp_ffjord.ode.solvers import FixedStepSolver
from tfp_ffjord.ode.solvers import Midpoint
from tfp_ffjord.ode.solvers import RK4
from tfp_ffjord.ode.solvers import Solver
from tfp_ffjord.ode.solvers import Tsit5
from tfp_ffjord.ode.tableaus import ButcherTableau

__all__ = [
    'AdaptiveSolver',
    'Adjoint',
    'Backprop',
    'ButcherTableau',
    'ConstantStepSize',
    'Diagnostics',
    'DormandPrince',
    'Euler',
    'FixedStepSolver',
    'Midpoint',
    'PIController',
    'RK4',
    'Results',
    'Solver',
    'SolverError',
    'Status',
    'Tsit5',
    'XLA_BACKPROP_MAX_NUM_STEPS',
    'checked_function',
    'checked_while_loop',
    'status_message',
]
