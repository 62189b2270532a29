"""What a run reads: folders, WebDataset tars, tables and datasets, eval layouts, object-store prefixes.
Every source kind and all knowledge of the eval layouts (classes, ground truth) lives here; no model, no task."""
