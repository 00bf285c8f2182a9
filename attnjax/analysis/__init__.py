"""attnjax/analysis."""
