"""torchkiln: a graph-level compiler and export toolchain for PyTorch.

compiled = torchkiln.compile(model, example_inputs, passes="cleanup,fold_batchnorm",
                             backend="onnxruntime", dynamic_axes="batch")
compiled(x); print(compiled.report.table()); compiled.save("out/")
again = torchkiln.load("out/")
torchkiln.compare_artifact(model, "out/", {"x": x}).summary()   # first module that differs
result = torchkiln.build("kiln.toml")                          # a recipe, as `kiln build` does
"""

from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass, registered_passes
from torchkiln.compiler.program import Program, TensorSpec
from torchkiln.compiler.trace import trace
from torchkiln.compiler.verify import Tolerance
from torchkiln.driver.api import compile
from torchkiln.driver.compiled import CompiledModel, load
from torchkiln.driver.partition import Partition, legal_cuts, load_partition, partition
from torchkiln.errors import (
    ArtifactError,
    BackendError,
    ConfigError,
    ExportError,
    InputError,
    KilnError,
    PassError,
    StorageError,
    TraceError,
    VerificationError,
)
from torchkiln.passes.distill import distill
from torchkiln.workflows.bench import bench_artifact, bench_model
from torchkiln.workflows.build import build
from torchkiln.workflows.compare import compare_artifact
from torchkiln.workflows.tune import tune

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "BackendError", "CompiledModel", "ConfigError", "ExportError", "InputError", "KilnError",
    "Partition", "Pass", "PassConfig", "PassError", "PassResult", "Program", "StorageError", "TensorSpec", "Tolerance", "TraceError",
    "VerificationError", "bench_artifact", "bench_model", "build", "compare_artifact", "compile", "distill", "legal_cuts", "load", "load_partition", "partition", "register_pass", "registered_passes", "trace", "tune",
]  # fmt: skip
