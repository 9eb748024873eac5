"""LightningModules: the learning methods built on diffto's layers."""
