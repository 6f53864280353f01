"""The seeds' public APIs, each a thin face over lowbit's core (port by changing an import)."""
