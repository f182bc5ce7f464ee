"""fedalora: federated LoRA with heterogeneous client ranks (Fed-ALoRA).

The core library needs no Flower: adapters, aggregation rules, models, data,
training and the run configuration. ``clients``, ``server`` and ``strategies`` wire
it into a Flower app.
"""

__version__ = "0.1.0"
