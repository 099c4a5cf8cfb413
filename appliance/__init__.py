"""Edge inference appliance for medical imaging."""

__version__ = "0.1.0"
