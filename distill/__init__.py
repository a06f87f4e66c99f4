"""Floor 3: stage 3 (distillation), the restoration networks and their registry, inference, metrics."""
