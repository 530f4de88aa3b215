"""Training: the LightningModule, the teacher signal (cached / online / fill), callbacks and cross-device gathers."""

from __future__ import annotations
