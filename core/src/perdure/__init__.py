"""perdure: durable execution for Python.

Write orchestrations as ordinary ``async def`` functions and activities as plain functions;
perdure records every completed step through a storage provider, so the code survives crashes,
restarts and deploys and resumes where it stopped.
"""

from perdure.client import Client, OrchestrationStatus
from perdure.connect import connect
from perdure.context import ActivityContext, OrchestrationContext
from perdure.engine import DurableFuture
from perdure.errors import (
    ActivityFailed,
    DurableTaskFailed,
    InstanceAlreadyExists,
    InstanceNotFound,
    NondeterminismError,
    NonDurableAwait,
    OrchestrationFailed,
    PerdureError,
    SubOrchestrationFailed,
    TaskCancelled,
    UnknownName,
)
from perdure.history import ErrorDetails
from perdure.provider import Capabilities, Provider, ProviderError
from perdure.registry import Registry
from perdure.retry import RetryPolicy
from perdure.runtime import Runtime, RuntimeOptions

__version__ = "0.1.0"

__all__ = [
    "ActivityContext",
    "ActivityFailed",
    "Capabilities",
    "Client",
    "DurableFuture",
    "DurableTaskFailed",
    "ErrorDetails",
    "InstanceAlreadyExists",
    "InstanceNotFound",
    "NonDurableAwait",
    "NondeterminismError",
    "OrchestrationContext",
    "OrchestrationFailed",
    "OrchestrationStatus",
    "PerdureError",
    "Provider",
    "ProviderError",
    "Registry",
    "RetryPolicy",
    "Runtime",
    "RuntimeOptions",
    "SubOrchestrationFailed",
    "TaskCancelled",
    "UnknownName",
    "connect",
    "__version__",
]
