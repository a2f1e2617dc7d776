"""ucgm: train, sample and analyse continuous generative models with one objective (UCGM-T) and one sampler (UCGM-S)."""

from .transports import OFFICIAL_HALF_PI, Prediction, Transport, TransportAdapter, make_transport

__all__ = ["OFFICIAL_HALF_PI", "Prediction", "Transport", "TransportAdapter", "make_transport"]
__version__ = "0.1.0"
