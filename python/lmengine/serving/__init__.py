"""Online serving: continuous batching (``Scheduler``), an asyncio engine (``AsyncEngine``) and
an OpenAI-compatible HTTP server (``lmengine.serving.server``, needs fastapi and uvicorn)."""

from lmengine.serving.async_engine import AsyncEngine
from lmengine.serving.scheduler import Scheduler, SchedulerStats, TokenEvent

__all__ = ["AsyncEngine", "Scheduler", "SchedulerStats", "TokenEvent"]
