"""Running a job: describing it, placing the model, the shard plan, the batch loop that joins loader, model,
task and writer, and run.json's content."""
