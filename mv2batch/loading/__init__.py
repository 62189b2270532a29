"""From records to batches of pixels: decoding, the protocols' resize / crop, the DataLoader and its workers,
shared-memory batches, the decode gate and the loader's resource choices (workers, batch size)."""
