"""The registry of experiments, by name, in the order ``diffmem reproduce`` runs them."""

from __future__ import annotations

from diffmem.experiments import (
    captions,
    conditional,
    detection,
    dimensions,
    flow,
    imaging,
    memorization_time,
    mitigation,
    networks,
    regularize,
    structured,
    sweeps,
    tradeoff,
    trajectories,
    transformed_time,
    transition,
)
from diffmem.experiments.base import ConfigError, Experiment

REGISTRY: dict[str, Experiment] = {
    exp.name: exp
    for exp in [
        trajectories.EXPERIMENT,
        transformed_time.EXPERIMENT,
        structured.EXPERIMENT,
        sweeps.TIKHONOV,
        sweeps.THRESHOLD,
        networks.NN_TIKHONOV,
        networks.NN_EARLY_STOPPING,
        networks.NN_WIDTH,
        conditional.CONDITIONAL_2D,
        conditional.INVERSE_DIGITS,
        imaging.SQUARES_CLOSED_FORM,
        imaging.SQUARES_UNET,
        imaging.DIGITS,
        tradeoff.TRADEOFF_2D,
        tradeoff.TRADEOFF_DIGITS,
        regularize.REGULARIZE_DIGITS,
        detection.DETECT_DIGITS,
        transition.SIZE_TRANSITION,
        memorization_time.EXPERIMENT,
        flow.EXPERIMENT,
        mitigation.EXPERIMENT,
        captions.EXPERIMENT,
        dimensions.EXPERIMENT,
    ]
}


def get_experiment(name: str) -> Experiment:
    """Look an experiment up by name."""
    if name not in REGISTRY:
        raise ConfigError(f"experiment: expected one of {', '.join(REGISTRY)}, "
                          f"received {name!r}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "ConfigError", "Experiment", "get_experiment"]
