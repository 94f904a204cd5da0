"""Workflows: what a user does with the compiler, as Python functions the ``kiln`` commands call.

* :func:`~torchkiln.workflows.build.build` — a ``kiln.toml`` recipe to a checked artifact (``kiln build``);
* :func:`~torchkiln.workflows.tune.tune` — a recipe's ``[tune]`` search (``kiln tune``);
* :func:`~torchkiln.workflows.compare.compare_artifact` — the first module an artifact differs at
  (``kiln compare``);
* :func:`~torchkiln.workflows.bench.bench_model` / :func:`~torchkiln.workflows.bench.bench_artifact` —
  runtimes timed side by side (``kiln bench``);
* :mod:`~torchkiln.workflows.pipeline` — running a partition's stages as a pipeline (``kiln partition``
  writes them; ``torchrun -m torchkiln.workflows.pipeline`` serves them);
* :mod:`~torchkiln.workflows.loading` — what a MODEL argument or a recipe's ``[model]`` names.

The floors: a workflow imports the driver, compiler, backends and passes, never ``torchkiln.cli``;
a ``cli`` module parses arguments, calls one workflow and prints (``tests/test_architecture.py``).
"""
