"""The thin Ray layer: cluster connection, merge tasks with a bounded window, the writer actor."""
