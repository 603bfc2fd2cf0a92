"""AnomalyDiffusion: few-shot generation of defect images with aligned masks, and its metrics."""
