"""The stages of MoE-I2, each a function with a typed result; :mod:`moei2.pipeline` drives them.

importance     pass 1: loss of dropping each expert alone, per-layer prune counts
selection      the search cache of one layer and its K candidate masks
kt             the block-wise KT-reception field, candidates applied through the routing
decomposition  survivor importance, ranks and whitened low-rank factors of one layer
recovery       optional LoRA fine-tuning of the compressed model
budget         budget mode: each layer's measured costs and the allocator's plan
"""
from .common import Context
from .decomposition import Decomposition, decompose_layer
from .importance import score_layer, prune_counts
from .kt import KTBlock, choose_block, masked_routing
from .recovery import Recovery, recover
from .selection import Selection, search_layer, select

__all__ = ["Context", "score_layer", "prune_counts", "Selection", "search_layer", "select",
           "KTBlock", "choose_block", "masked_routing", "Decomposition", "decompose_layer", "Recovery", "recover"]
