"""Older boost_config.json files → the current form, in one function: every compatibility rule for saved folders.

`Upsampler.from_config` (so `from_pretrained` and `BoostPipeline`) runs it on the whole file, and the sections'
own `from_dict` (`SamplerConfig`, `CouplingFlowMatcher`, `DetailCalibration`) run it on theirs, so an old section
reads the same wherever it comes from. A setting that was removed is dropped at its neutral value and refused,
with what to use instead, at any other.
"""

from __future__ import annotations

from collections.abc import Mapping


def upgrade_boost_config(config: Mapping) -> dict:
    """A boost_config.json dict (or some of its sections) in the current form; the input is not changed.

    sampler: absent in the oldest folders (defaults), partial dicts take defaults (`SamplerConfig.from_dict`);
        "temperature" (removed: it moved along the dial's own curve, RESULTS.md) is dropped at 1, refused else.
    flow: "dial": "blend" (the latent dial, now the image-space one of `Upsampler.finish`) is dropped,
        "end_time" refused (it measured on the same curve).
    detail_calibration: "samples": 1 is dropped; two-sample dials are refused (they earned nothing at the default
        operating point, RESULTS.md); a dial without "sampler" / "back_project" is taken as fitted for any.
    """
    config = dict(config)
    sampler = dict(config.get("sampler") or {})
    temperature = sampler.pop("temperature", 1.0)
    if temperature != 1.0:
        raise ValueError(f"sampler temperature {temperature} is no longer supported (only 1, as trained): "
                         "RESULTS.md measured it on the same curve as `detail`; use detail instead")
    config["sampler"] = sampler
    if "flow" in config:
        flow = dict(config["flow"])
        dial = flow.pop("dial", "blend")
        if dial != "blend":
            raise ValueError(f"dial {dial!r} is no longer supported: RESULTS.md measured 'end_time' on the same "
                             "curve as the image-space dial `detail`, which every upsampler now uses")
        config["flow"] = flow
    if config.get("detail_calibration") is not None:
        dial = dict(config["detail_calibration"])
        if dial.pop("samples", 1) != 1:
            raise ValueError("this detail_calibration blends two samples, which is no longer supported: run "
                             "`fmboost calibrate-detail DIR --data VALIDATION_IMAGES` to fit a one-sample dial")
        config["detail_calibration"] = dial
    return config
