"""A rank-recovery benchmark with a known answer: does a method give rank to the matrices that need it?

No public benchmark tests FlexLoRA's allocation claim directly, so we plant one. A frozen random residual
network (:class:`SyntheticNet`) is the backbone; a teacher equals that network plus, on every adapted matrix
``k``, an update ``dW*_k`` of known rank ``r*_k`` (:func:`draw_teacher`). A student (the frozen network with
adapters) regresses the teacher's outputs from Gaussian inputs (:func:`make_regression_data`). Afterwards
:func:`rank_spearman` asks whether the final live ranks track ``r*_k`` and :func:`captured_energy` how much of
the teacher's update the learned adapters reproduce.

Design choices, each so that *rank* is the only thing that differs between matrices:

* Every base weight is a random orthogonal ``d x d`` matrix (all singular values 1), so each matrix is equally
  well conditioned and has the same Frobenius norm ``sqrt(d)``.
* Every teacher update has the same Frobenius norm ``update_scale * sqrt(d)``; a rank-1 update is one strong
  direction, a rank-16 one spreads the same energy over 16 directions.
* Target ranks sum exactly to the global budget ``n x r0`` that the adapters are given, so a perfect
  allocator can in principle match them.

Everything is float32 and drawn from explicit seeds (never the global RNG): the same seeds give bit-identical
networks, teachers and data.
"""

from flexlora.synthetic.metrics import (
    RegressionSplit,
    captured_energy,
    learned_updates,
    make_regression_data,
    per_matrix_energy,
    rank_spearman,
    regression_metrics,
    relative_output_change,
)
from flexlora.synthetic.net import (
    DEFAULT_DECAY,
    DEFAULT_RANK_SIGMA,
    DEFAULT_UPDATE_SCALE,
    SyntheticConfig,
    SyntheticNet,
    build_frozen_net,
    random_orthonormal,
)
from flexlora.synthetic.teacher import Teacher, TeacherSpec, draw_target_ranks, draw_teacher, singular_values

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_RANK_SIGMA",
    "DEFAULT_UPDATE_SCALE",
    "RegressionSplit",
    "SyntheticConfig",
    "SyntheticNet",
    "Teacher",
    "TeacherSpec",
    "build_frozen_net",
    "captured_energy",
    "draw_target_ranks",
    "draw_teacher",
    "learned_updates",
    "make_regression_data",
    "per_matrix_energy",
    "random_orthonormal",
    "rank_spearman",
    "regression_metrics",
    "relative_output_change",
    "singular_values",
]
