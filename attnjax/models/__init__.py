"""attnjax/models."""
