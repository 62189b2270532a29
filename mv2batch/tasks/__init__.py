"""What a run computes from the model's outputs: classify, segment and embed (columns, device work, rows),
post-processing (top-k, upsampling), metrics and mask files."""
