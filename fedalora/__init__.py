"""fedalora: federated LoRA with heterogeneous client ranks (Fed-ALoRA).

The core library needs no Flower: adapters, aggregation rules, models, data,
training and the run configuration. ``clients``, ``server`` and ``strategies`` wire
it into a Flower app.
"""

__version__ = "0.1.0"

import logging

# bitsandbytes (imported by PEFT) warns on import on CPUs with AVX512-BF16 that it
# cannot fetch an optional kernel from the Hugging Face hub, which this offline
# framework never reaches; its portable CPU kernels are used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
