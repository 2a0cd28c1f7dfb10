"""Flow Matching core in pure PyTorch: paths, couplings, losses, models, solvers, likelihood, metrics.

Never imports ray or mlflow. Convention: t = 0 is noise (x_0), t = 1 is data (x_1).
"""

from fm.couplings import make_coupling
from fm.methods import METHODS, FlowMethod, Method, make_method
from fm.models import build_model
from fm.paths import AffinePath, GeneralPath, NoisyLinearPath, PathSample, make_path
from fm.solvers import ode_sample, sde_sample, velocity_fn

__all__ = [
    "AffinePath",
    "GeneralPath",
    "METHODS",
    "FlowMethod",
    "Method",
    "NoisyLinearPath",
    "PathSample",
    "build_model",
    "make_coupling",
    "make_method",
    "make_path",
    "ode_sample",
    "sde_sample",
    "velocity_fn",
]
