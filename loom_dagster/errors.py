"""Errors raised by loom-dagster, each naming the flow and what to do about it."""

from __future__ import annotations


class LoomDagsterError(Exception):
    """Base class of every error loom-dagster raises on purpose."""


class FlowLoadError(LoomDagsterError):
    """A flow could not be imported, is not a StreamFlow, or its config could not be loaded."""


class FlowCompileError(LoomDagsterError):
    """loom refused to compile a flow against its config."""


class LineageMismatchError(LoomDagsterError):
    """The compiled plan's sinks disagree with the sink assets declared in the asset graph."""


class DuplicateAssetKeyError(LoomDagsterError):
    """Two flows (or a flow and a sink) map to the same asset key in conflicting roles."""


class DeploymentError(LoomDagsterError):
    """A deployment could not be launched, did not become healthy, or could not be stopped."""
