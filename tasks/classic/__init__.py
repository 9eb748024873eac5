"""Classic control systems as differentiable dynamics modules."""
