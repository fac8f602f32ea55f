"""The OpenAI-compatible HTTP API (beside gRPC `moe.v1.Inference`, over the same servicer)."""

from router.openai_api.http import OpenAIFrontend, openai_ingress

__all__ = ["OpenAIFrontend", "openai_ingress"]
