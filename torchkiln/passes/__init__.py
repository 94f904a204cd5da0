"""The built-in passes, one module per family; each is registered by name (``kiln passes`` lists
them) and importable here: ``passes=["cleanup", FoldBatchNorm(), ("quantize", {"mode": "dynamic"})]``
(a name, an instance — ``Prune(Prune.Config(ratio=0.5))`` — or a name with its options)."""

from torchkiln.passes.cleanup import Cleanup
from torchkiln.passes.cluster import ClusterWeights
from torchkiln.passes.distill import Distill
from torchkiln.passes.fold_batchnorm import FoldBatchNorm
from torchkiln.passes.lowrank import FactorizeLowRank
from torchkiln.passes.prune import Prune
from torchkiln.passes.quantize import Quantize

__all__ = ["Cleanup", "ClusterWeights", "Distill", "FactorizeLowRank", "FoldBatchNorm", "Prune", "Quantize"]
