"""lit_route: RLHF with uncertainty-routed rewards.

A pairwise preference model with an SNGP head reports how unsure it is; a router sends the unsure pairs to a
strong LLM judge; RLOO turns the routed pairwise scores into advantages.
"""

__version__ = "0.1.0"
