"""Value sets a code may take (grids), looked up by name."""

from lowbit.grids.codebook import CodebookGrid
from lowbit.grids.registry import Grid, available_grids, get_grid, register_grid
from lowbit.grids.uniform import UniformIntGrid

__all__ = ["CodebookGrid", "Grid", "UniformIntGrid", "available_grids", "get_grid", "register_grid"]
