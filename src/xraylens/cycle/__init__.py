"""The CAM-guided enhancement cycle (see `xraylens.cycle.run`)."""

from xraylens.cycle.run import CYCLE_COLUMNS, cycle_run, emphasis_weights, enhance

__all__ = ["CYCLE_COLUMNS", "cycle_run", "emphasis_weights", "enhance"]
