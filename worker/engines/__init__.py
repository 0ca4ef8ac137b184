"""The engines this install can run: echo always, the model engines when their packages import.

`echo` needs nothing beyond the worker itself. `llm`, `image` and `embedding` need the heavy `engines` extra (torch,
transformers, diffusers); their modules are imported only when asked for, so an echo-only worker never
imports torch.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Collection
from types import ModuleType
from typing import get_args

from sdk.api import JobType
from worker.config import ConfigError
from worker.engines.base import BaseEngine
from worker.engines.echo import EchoEngine

logger = logging.getLogger(__name__)

#: Engines that need the heavy `engines` extra (torch), by job type; a worker without it still runs echo jobs.
MODEL_ENGINE_MODULES = {
    "llm": "worker.engines.llm",
    "image": "worker.engines.image",
    "embedding": "worker.engines.embedding",
}


def available_engines(job_types: Collection[str] | None = None) -> dict[str, BaseEngine]:
    """The engines for `job_types`; an asked-for engine that cannot be imported is a ConfigError.
    Without `job_types`: echo, plus each model engine whose module imports here (a log line when not)."""
    wanted = set(get_args(JobType) if job_types is None else job_types)
    engines: dict[str, BaseEngine] = {EchoEngine.job_type: EchoEngine()} if EchoEngine.job_type in wanted else {}
    for job_type, module_name in MODEL_ENGINE_MODULES.items():
        if job_type not in wanted:
            continue  # never imported: an echo-only worker does not load torch
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if job_types is not None:
                raise ConfigError(f"the {job_type} engine cannot run here ({exc}); install gpu-fabric[engines]") from None
            logger.info("%s unavailable (%s); install gpu-fabric[engines] to run it", module_name, exc)
            continue
        except Exception:
            if job_types is not None:
                raise
            # A broken engine must not keep the others from serving.
            logger.exception("%s failed to import; running without it", module_name)
            continue
        for engine_class in _engine_classes(module):
            if engine_class.job_type in wanted:
                engines[engine_class.job_type] = engine_class()
    return engines


def _engine_classes(module: ModuleType) -> list[type[BaseEngine]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseEngine)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]
