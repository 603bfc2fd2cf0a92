"""Human-facing outputs: heat-map overlays and tables."""
