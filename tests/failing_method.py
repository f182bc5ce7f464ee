"""A method whose clients always fail after training (FedIT otherwise): a run of it
trains nothing, and must say so. Run it with
``--run-config "strategy='tests.failing_method:FailingUpload'"``.
"""

from __future__ import annotations

from fedalora.adapters import ClientAdapter
from fedalora.methods import register_method
from fedalora.methods.fedit import FedIT
from fedalora.types import Arrays

FAILURE = "this client's upload fails on purpose"


@register_method
class FailingUpload(FedIT):
    """FedIT whose every client raises when it would upload."""

    name = "failing-upload"
    paper = None

    def upload(self, adapter: ClientAdapter) -> Arrays:
        raise RuntimeError(FAILURE)
