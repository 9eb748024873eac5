"""Shipped LightningCLI configs; a bare ``--config NAME`` resolves against this folder."""
