"""Files to device-resident seeded batches: the readers (one registry), image folders, the meta
split and long tail, label noise, device batches, and a run's data built from its config."""
