"""Label builders for public cohorts (used by pipelines/<dataset>/)."""
