"""Training: ``train(config)`` runs one training run, new or resumed, to its end, in this
process; ``train_in_processes(config)`` runs it as ``config.processes`` processes (the
command line's ``--processes``), each of which calls ``train``.

The loop reads top to bottom in :mod:`~cifar_inception.training.loop`. What it uses:
:mod:`~cifar_inception.training.setup` (threads, the data on the device, the model, and the
``Loop`` that holds them), :mod:`~cifar_inception.training.step` (the one training step),
:mod:`~cifar_inception.training.optim` (the optimiser, the learning-rate schedule,
lookahead, the loss),
:mod:`~cifar_inception.training.resume` (continuing a run),
:mod:`~cifar_inception.training.record` (the run folder and its config.json) and
:mod:`~cifar_inception.training.budgeting` (fitting a run to ``--budget``).
"""

from cifar_inception.training.loop import train
from cifar_inception.training.ranks import splits_into_processes, train_in_processes
from cifar_inception.training.result import TrainResult
from cifar_inception.training.resume import resume_config

__all__ = ["TrainResult", "resume_config", "splits_into_processes", "train",
           "train_in_processes"]
