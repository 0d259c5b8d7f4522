"""Task pipelines (diffusers `DiffusionPipeline`s), batch jobs and the `mmdlm` command line.

Pipelines are imported lazily, so `import pipelines` stays cheap and one task's extra dependencies
never break another's import. What they share (local loading, outputs, callbacks, decoding settings,
prompt encoding) is in `pipelines.base`.
"""

import importlib

_LAZY = {
    "PipelineOutput": "pipelines.base",
    "PrefixDiffusionPipeline": "pipelines.base",
    "encode_prompts": "pipelines.base",
    "TextDiffusionPipeline": "pipelines.text",
    "TextDiffusionPipelineOutput": "pipelines.text",
    "CaptioningPipeline": "pipelines.captioning",
    "CaptioningPipelineOutput": "pipelines.captioning",
    "LatentReasoningPipeline": "pipelines.latent_reasoning",
    "LatentReasoningOutput": "pipelines.latent_reasoning",
    "PlanningPipeline": "pipelines.planning",
    "PlanningPipelineOutput": "pipelines.planning",
    "SpokenQAPipeline": "pipelines.spoken_qa",
    "SpokenQAPipelineOutput": "pipelines.spoken_qa",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


__all__ = sorted(_LAZY)
