"""fmboost.pipelines: BoostPipeline and the `fmboost` command line.

`BoostPipeline` is imported lazily so `fmboost info` and other light commands don't pay for diffusers'
pipeline machinery.
"""

__all__ = ["BoostPipeline", "BoostPipelineOutput"]


def __getattr__(name: str):
    if name in __all__:
        from . import boost

        return getattr(boost, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
