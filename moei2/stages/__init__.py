"""The stages of MoE-I2, each a function with a typed result; :mod:`moei2.pipeline` drives them.

Each stage's result over a run (:class:`PruneAllocation`, :class:`Selections`, :class:`KTChoices`,
:class:`LowRankLayers`) records itself in the run state under its own keys, so that a rerun resumes
from it, and gives its part of the report; so does :class:`Recovery` (not resumed: it runs once,
last).

importance     pass 1: loss of dropping each expert alone, per-layer prune counts
selection      the search cache of one layer and its K candidate masks
kt             the block-wise KT-reception field, candidates applied through the routing
decomposition  survivor importance, ranks and whitened low-rank factors of one layer
recovery       optional LoRA fine-tuning of the compressed model
budget         budget mode: each layer's measured costs and the allocator's plan
"""
from .common import Context
from .decomposition import Decomposition, LowRankLayers, decompose_layer
from .importance import PruneAllocation, score_layer, prune_counts
from .kt import KTBlock, KTChoices, choose_block, masked_routing
from .recovery import Recovery, recover
from .selection import Selection, Selections, search_layer, select

__all__ = ["Context", "PruneAllocation", "score_layer", "prune_counts", "Selection", "Selections", "search_layer",
           "select", "KTBlock", "KTChoices", "choose_block", "masked_routing", "Decomposition", "LowRankLayers",
           "decompose_layer", "Recovery", "recover"]
