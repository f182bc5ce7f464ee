"""The Flower side of the server: one strategy for every federated method (and its
client-level DP form), node discovery and the round loop."""

from .discovery import Node, discover_nodes
from .method_strategy import MethodStrategy
from .private_strategy import PrivateMethodStrategy, make_strategy
from .round_loop import run_rounds

__all__ = [
    "MethodStrategy",
    "Node",
    "PrivateMethodStrategy",
    "discover_nodes",
    "make_strategy",
    "run_rounds",
]
