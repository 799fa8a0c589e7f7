"""The work folder, the per-slide stages and the one loop that runs them over a cohort."""
