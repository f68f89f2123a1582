"""daralign: online alignment from AI feedback (Direct Advantage Regression and baselines)."""

__version__ = "0.1.0"
