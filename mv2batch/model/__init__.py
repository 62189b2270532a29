"""The model: checkpoints from the hub or a folder, device and dtype, the speed-ups and rewrites (probed
against transformers), channels-last memory, CPU streams and the allocator settings."""
