"""The Flower side of the server: one strategy for every federated method, node
discovery and the round loop."""

from .discovery import Node, discover_nodes
from .method_strategy import MethodStrategy
from .round_loop import run_rounds

__all__ = ["MethodStrategy", "Node", "discover_nodes", "run_rounds"]
